"""Batched serving is exact per request (issue 26): several requests in one llama.cpp context, one decode per
tick, give each request the answer it gets alone, with identical step events, on the exact path (f32 weights,
f32 KV, flash attention off, CPU).

Mixed in every batch: LLaDA2.0 threshold decoding, 2.1 speed and quality, 2.2 insert/delete; prompts that end
at different block positions; stop ids; seeded sampling; requests that start, finish and are cancelled while
the others are mid-block. Isolation is checked with neighbours that would change the answer if they leaked.
"""
from __future__ import annotations

import numpy as np
import pytest

from converters import convert
from dllm_cli.decoding import make_config
from dllm_cli.decoding.engine import generate
from dllm_cli.decoding.events import DoneEvent, StartEvent, StepEvent
from dllm_cli.runtime.batch import BatchContext, Work
from dllm_cli.runtime.model import Model
from dllm_cli.runtime.options import RuntimeOptions
from dllm_cli.runtime.scheduler import Cancelled, Scheduler
from dllm_cli.runtime.session import Session
from batched_helpers import Req, alone, key, run_batched
from runtime_marks import needs_runtime
from test_llada22 import write_llada22

pytestmark = needs_runtime
EXACT = RuntimeOptions(kv_type="f32", flash_attn=False, threads=1)  # the exact path; one thread on a shared CPU


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Tiny f32 GGUFs of LLaDA2.0, 2.1 and 2.2 (the 2.2 one with block routing and DELETE/SPLIT)."""
    from dllm_cli.demo.checkpoint import tiny_config, write_checkpoint

    d = tmp_path_factory.mktemp("batched")
    out = {}
    for version in ("2.0", "2.1"):
        write_checkpoint(d / version, tiny_config(), seed=7)
        out[version] = Model(convert(d / version, d / f"{version}.gguf", outtype="f32", model_version=version).path,
                             EXACT)
    write_llada22(d / "2.2", edit_boost=3.0)
    out["2.2"] = Model(convert(d / "2.2", d / "2.2.gguf", outtype="f32").path, EXACT)
    yield out
    for m in out.values():
        m.close()


def prompt(model: Model, n: int, seed: int) -> list[int]:
    rng = np.random.default_rng(seed)
    top = min(model.n_vocab, 200)
    return [int(t) for t in rng.integers(3, top, n) if t != model.mask_id] or [5]


def cfg(model: Model, mode: str, **over):
    over.setdefault("max_tokens", 32)
    return make_config(mode, model.version, model.presets, **over)


def mixed(model: Model, n: int) -> list[Req]:
    """``n`` requests of different modes, prompt lengths (block positions), stops and sampling."""
    lengths = [5, 31, 32, 40, 63, 70, 17, 96]
    modes = ["quality", "speed"]
    reqs = []
    for i in range(n):
        over: dict = {}
        if i % 3 == 1:
            over.update(temperature=0.8, top_k=20, seed=100 + i)  # seeded sampling
            if model.version == "2.2":
                over.update(editing=False)  # 2.2 editing decodes greedily
        if i % 4 == 2:
            over.update(stop_ids=(int(prompt(model, 3, 50 + i)[0]),))
        if i % 4 == 3:
            over.update(max_tokens=64)
        reqs.append(Req(prompt(model, lengths[i % len(lengths)], i), cfg(model, modes[i % 2], **over), slot=i))
    return reqs


def check_same(model: Model, reqs: list[Req]) -> None:
    with Session(model, EXACT) as s:
        for r in reqs:
            assert r.error is None, r.error
            want = alone(s, r)
            got = [key(ev) for ev in r.events]
            assert got == want
            assert isinstance(r.events[-1], DoneEvent) and any(isinstance(e, StepEvent) for e in r.events)


@pytest.mark.parametrize("version", ["2.0", "2.1", "2.2"])
@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_batched_requests_equal_their_answers_alone(models, version, n):
    model = models[version]
    with BatchContext(model, EXACT, n_seq=n) as ctx:
        sched = Scheduler(ctx)
        reqs = mixed(model, n)
        run_batched(sched, reqs)
        if n > 1:
            assert sched.ticks < sum(r.events[-1].forwards + r.events[-1].commits for r in reqs)  # work was shared
        check_same(model, reqs)


def test_mixed_versions_starting_finishing_and_cancelled_mid_block(models):
    """Requests arrive at different ticks, one is cancelled mid-block, short ones finish while long ones run;
    the survivors' answers are their answers alone."""
    model = models["2.1"]
    with BatchContext(model, EXACT, n_seq=4) as ctx:
        sched = Scheduler(ctx)
        reqs = [Req(prompt(model, 40, 1), cfg(model, "quality", max_tokens=90), slot=0),
                Req(prompt(model, 9, 2), cfg(model, "speed", max_tokens=8), slot=1, start_tick=2),
                Req(prompt(model, 33, 3), cfg(model, "quality", max_tokens=90), slot=2, start_tick=1, cancel_after=3),
                Req(prompt(model, 64, 4), cfg(model, "speed", max_tokens=60, temperature=0.7, seed=9), slot=3,
                    start_tick=5)]
        run_batched(sched, reqs)
        cancelled = reqs[2]
        assert cancelled.cancelled and isinstance(cancelled.error, Cancelled)
        # its slot is consistent again: the KV cells match the committed tokens
        assert len(ctx.cached[2]) % model.block_length == 0
        check_same(model, [reqs[0], reqs[1], reqs[3]])
        # a new request on the cancelled slot reuses its prefix and is still exact
        again = Req(reqs[2].ids, cfg(model, "quality", max_tokens=30), slot=2)
        run_batched(sched, [again])
        start = again.events[0]
        assert isinstance(start, StartEvent) and start.reused == model.block_length
        with Session(model, EXACT) as s:
            s.commit(again.ids[:model.block_length], 0)  # alone with the same prefix cached
            rng = np.random.default_rng(again.config.seed)
            want = [key(ev) for ev in generate(s, again.ids, again.config, rng=rng)]
        assert [key(ev) for ev in again.events] == want


def test_neighbours_that_would_leak_change_nothing(models):
    """Two different neighbours at the same positions (same routing-block key but the sequence id) leave a
    request's logits bit-identical to its logits alone, while the model is sensitive to exactly that content
    when it is visible (prepended to the request's own context): a leak through the mask or the block-routing
    pool would show."""
    for version in ("2.1", "2.2"):
        model = models[version]
        B = model.block_length
        a, blk = prompt(model, 2 * B, 11), prompt(model, B, 12)
        n1, n2 = prompt(model, 2 * B, 13), prompt(model, 2 * B, 14)
        rows = list(range(B))
        with Session(model, EXACT, device_confidence=False) as s:
            s.commit(a, 0)
            want = s.step(blk, 2 * B, rows, want_logits=True).logits
            s.reset()
            s.commit(n1[:B] + a[B:], 0)  # the neighbour's content visible to the request: a different answer
            seen = s.step(blk, 2 * B, rows, want_logits=True).logits
        assert np.abs(seen - want).max() > 1e-3
        with BatchContext(model, EXACT, n_seq=3, device_confidence=False) as ctx:
            ctx.decode([Work(0, a, 0, True), Work(1, n1, 0, True), Work(2, n2, 0, True)])
            for other in (n1, n2):
                nb = other[:B]
                outs = ctx.decode([Work(0, blk, 2 * B, False, rows, True), Work(1, nb, 2 * B, False, rows, True),
                                   Work(2, list(reversed(nb)), 2 * B, False, rows, True)])
                assert outs[0] is not None and outs[0].logits is not None
                assert np.array_equal(outs[0].logits, want)


@pytest.fixture(scope="module")
def q4km(tmp_path_factory):
    """A 256-wide tiny MoE LLaDA2 at Q4_K_M (its output head Q6_K, vocab a multiple of 8: repacked on x86)."""
    from dllm_cli.demo.checkpoint import tiny_config, write_checkpoint
    from dllm_cli.runtime.quantize import quantize

    d = tmp_path_factory.mktemp("q4km")
    cfg = tiny_config(hidden_size=256, intermediate_size=512, moe_intermediate_size=256, head_dim=64)
    vocab = write_checkpoint(d / "probe", cfg)["vocab_size"]
    write_checkpoint(d / "ckpt", cfg, seed=5, head_scale=2.0, vocab_pad=13 + (-vocab) % 8)
    f32 = convert(d / "ckpt", d / "m-f32.gguf", outtype="f32").path
    model = Model(quantize(f32, d / "m-q4_k_m.gguf", "q4_k_m"), EXACT)
    yield model
    model.close()


def test_quantized_batched_logits_are_bounded_and_greedy_answers_equal(q4km):
    """Quantized weights are multiplied by ggml's repacked kernels, which take rows four at a time and the rest one
    at a time: a request's output rows can land in the other kernel when a neighbour adds rows, and sum in
    another order. The difference stays at float32 rounding (bounded here) and greedy answers are unchanged."""
    model = q4km
    B = model.block_length
    a, blk, other = prompt(model, 2 * B, 21), prompt(model, B, 22), prompt(model, 2 * B, 23)
    worst = 0.0
    with Session(model, EXACT, device_confidence=False) as s, \
            BatchContext(model, EXACT, n_seq=2, device_confidence=False) as ctx:
        s.commit(a, 0)
        ctx.decode([Work(0, a, 0, True), Work(1, other, 0, True)])
        for rows in ([5], list(range(B)), list(range(0, B, 3)), list(range(7))):
            want = s.step(blk, 2 * B, rows, want_logits=True).logits
            for rb in ([], [2], list(range(B)), list(range(5))):
                out = ctx.decode([Work(0, blk, 2 * B, False, rows, True), Work(1, other[:B], 2 * B, False, rb, True)])
                got = out[0].logits if out[0] is not None else None
                assert got is not None and np.array_equal(got.argmax(1), want.argmax(1))
                worst = max(worst, float(np.abs(got - want).max()))
    assert worst < 1e-4, worst
    reqs = mixed(model, 4)
    for r in reqs:
        r.config = cfg(model, r.config.mode, max_tokens=24)  # greedy
    with BatchContext(model, EXACT, n_seq=4) as ctx:
        run_batched(Scheduler(ctx), reqs)
    with Session(model, EXACT) as s:
        for r in reqs:
            assert r.error is None
            want = [ev for ev in alone(s, r) if isinstance(ev, DoneEvent)][0]
            done = r.events[-1]
            assert isinstance(done, DoneEvent) and (done.ids, done.forwards) == (want.ids, want.forwards)
