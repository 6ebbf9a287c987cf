"""The batched runtime's guards and the scheduler's tick planning (issue 26).

``BatchContext`` refuses, with a ``DllmError`` and before llama.cpp could abort, every decode it cannot run
exactly; the scheduler's plan packs steps, chunks prompts in whole blocks into the room left, fails only the
ops of a failed decode and answers a cancelled request's op without decoding it.
"""
from __future__ import annotations

import threading
import time
from types import SimpleNamespace
from dataclasses import dataclass, field

import numpy as np
import pytest

from dllm_cli.decoding.stepper import StepOutput
from dllm_cli.errors import ContextFullError, DecodeError
from dllm_cli.runtime.batch import Work
from dllm_cli.runtime.options import RuntimeOptions
from dllm_cli.runtime.scheduler import Cancelled, Scheduler, _Op
from runtime_marks import needs_runtime

B = 4


@dataclass
class FakeCtx:
    """Records the decodes a tick asks for; ``fail`` makes a decode holding that sequence raise."""

    n_ubatch: int = 16
    block_length: int = B
    n_vocab: int = 10
    mask_id: int = 9
    n_ctx: int = 64
    fail: int | None = None
    model: object = field(default_factory=lambda: SimpleNamespace(eos_id=8, edit_ids=None))
    cached: list[list[int]] = field(default_factory=lambda: [[], [], []])
    decodes: list[list[tuple[int, int, int, bool]]] = field(default_factory=list)

    def decode(self, works: list[Work]) -> list:
        self.decodes.append([(w.seq, w.start, len(w.tokens), w.keep) for w in works])
        if self.fail is not None and any(w.seq == self.fail for w in works):
            raise DecodeError("boom")
        return [None if w.keep else StepOutput(np.zeros((len(w.rows), 2), np.int32),
                                               np.zeros((len(w.rows), 2), np.float32)) for w in works]


def tick(sched: Scheduler, ops: list[_Op], cancelled: frozenset[int] = frozenset()) -> None:
    """One tick with exactly ``ops``' requests attached and waiting."""
    sched._attached = {op.seq: (lambda s=op.seq: s in cancelled) for op in ops}
    sched._pending = {op.seq: op for op in ops}
    assert sched.pump(0)


def test_plan_packs_steps_and_chunks_prefill_in_whole_blocks():
    ctx = FakeCtx()
    sched = Scheduler(ctx)  # type: ignore[arg-type]
    step = _Op(0, [1] * B, 8, False, [0, 1])
    prefill = _Op(1, [2] * (6 * B), 0, True)  # 24 tokens: more than the 12 the step leaves
    tick(sched, [step, prefill])
    assert ctx.decodes == [[(0, 8, 4, False), (1, 0, 12, True)]]  # one decode: the step and 3 whole blocks
    assert step.finished.is_set() and not prefill.finished.is_set() and prefill.done == 12
    tick(sched, [prefill])
    assert ctx.decodes[-1] == [(1, 12, 12, True)] and prefill.finished.is_set() and prefill.error is None


def test_plan_separates_attention_blocks_and_shares_prefill_round_robin():
    ctx = FakeCtx(n_ubatch=12)
    sched = Scheduler(ctx)  # type: ignore[arg-type]
    window = _Op(0, [1] * (2 * B), 0, False, [0], attn_block=0)  # multi-block editing: all 8 see each other
    a, b = _Op(1, [2] * (4 * B), 0, True), _Op(2, [3] * (4 * B), 0, True)
    tick(sched, [window, a, b])
    assert ctx.decodes[0] == [(0, 0, 8, False)]  # never mixed with block-causal work
    assert ctx.decodes[1] == [(2, 0, 12, True)]  # the room goes to one prompt this tick ...
    tick(sched, [a, b])
    assert ctx.decodes[2] == [(1, 0, 12, True)]  # ... and to the other one first in the next
    while not (a.finished.is_set() and b.finished.is_set()):
        tick(sched, [op for op in (a, b) if not op.finished.is_set()])
    assert a.error is None and b.error is None and a.done == b.done == 16
    assert all(sum(n for _, _, n, _ in d) <= 12 and all(n % B == 0 for _, _, n, _ in d) for d in ctx.decodes)


def test_a_failed_decode_fails_only_its_ops_and_cancelled_ops_are_not_decoded():
    ctx = FakeCtx(n_ubatch=4, fail=1)  # one step per decode
    sched = Scheduler(ctx)  # type: ignore[arg-type]
    ok, bad, gone = _Op(0, [1] * B, 0, False, [0]), _Op(1, [1] * B, 0, False, [0]), _Op(2, [1] * B, 0, False, [0])
    tick(sched, [ok, bad, gone], cancelled=frozenset({2}))
    assert isinstance(gone.error, Cancelled) and all(s != 2 for d in ctx.decodes for s, *_ in d)
    assert isinstance(bad.error, DecodeError)
    assert ok.error is None and ok.result is not None  # its own decode went through


def test_ticks_wait_for_every_attached_request_and_close_cancels_waiters():
    ctx = FakeCtx()
    sched = Scheduler(ctx)  # type: ignore[arg-type]
    errors: list[BaseException] = []

    def body(seq: int) -> None:
        try:
            with sched.attached(seq) as m:
                m.step([1] * B, 0, [2, 0])
                m.step([1] * B, 0, [1])
        except BaseException as e:  # close() below
            errors.append(e)

    threads = [threading.Thread(target=body, args=(s,)) for s in (0, 1)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 10
    while not ctx.decodes:
        sched.pump(0.05)
        assert time.monotonic() < deadline
    assert sorted(s for s, *_ in ctx.decodes[0]) == [0, 1]  # the first tick held both requests' steps
    sched.close()
    for t in threads:
        t.join(5)
    assert len(errors) == 2 and all(isinstance(e, Cancelled) for e in errors)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from converters import convert
    from dllm_cli.demo.checkpoint import tiny_config, write_checkpoint
    from dllm_cli.runtime.model import Model

    d = tmp_path_factory.mktemp("bu")
    write_checkpoint(d / "ck", tiny_config(), seed=1)
    m = Model(convert(d / "ck", d / "m.gguf", outtype="f32").path, RuntimeOptions(threads=1))
    yield m
    m.close()


@needs_runtime
def test_batch_context_refuses_what_llama_cpp_would_abort_on(tiny):
    from dllm_cli.runtime.batch import BatchContext

    opts = RuntimeOptions(threads=1, ctx_size=96, ubatch=64)
    with pytest.raises(DecodeError, match="--parallel"):
        BatchContext(tiny, opts, n_seq=0)
    with BatchContext(tiny, opts, n_seq=2) as ctx:
        Bl, blk = ctx.block_length, [5] * ctx.block_length
        assert ctx.n_ubatch == 128 and ctx.n_ctx == 96  # room for every slot's block twice; ctx per slot
        bad = [([Work(0, blk, Bl, True)], "committed"),  # a gap in the cache
               ([Work(0, blk, 0, True), Work(0, blk, 0, True)], "one work per sequence"),
               ([Work(0, [5] * 5, 0, True)], "whole blocks"),
               ([Work(0, blk * 4, 0, True), Work(1, blk * 2, 0, True)], "n_ubatch"),
               ([Work(0, [10 ** 6] * Bl, 0, True)], "vocabulary"),
               ([Work(0, blk, 0, False, [Bl])], "rows"),
               ([Work(2, blk, 0, True)], "sequence 2")]
        for works, what in bad:
            with pytest.raises(DecodeError, match=what):
                ctx.decode(works)
        with pytest.raises(ContextFullError):
            ctx.decode([Work(1, blk * 4, 0, True)])
        assert ctx.cached == [[], []]
        ctx.decode([Work(0, blk, 0, True), Work(1, blk * 2, 0, True)])  # it still works, exactly as asked
        assert [len(c) for c in ctx.cached] == [Bl, 2 * Bl]
        ctx.rollback(1, Bl)
        out = ctx.decode([Work(1, blk, Bl, False, [3])])[0]
        assert out is not None and out.ids.shape == (1, 2) and len(ctx.cached[1]) == Bl



@needs_runtime
def test_the_kv_memory_printed_at_start_up_is_what_llama_cpp_allocates(tiny):
    import re

    from dllm_cli.runtime import library
    from dllm_cli.runtime.batch import BatchContext

    for n_seq, ctx_size, kv in ((1, 4096, "f32"), (4, 1000, "f32"), (3, 512, "f16")):
        with library.captured_log() as lines:
            ctx = BatchContext(tiny, RuntimeOptions(threads=1, ctx_size=ctx_size, kv_type=kv), n_seq=n_seq)
        with ctx:
            sizes = [float(m.group(1)) for line in lines if (m := re.search(r"KV buffer size = +([0-9.]+) MiB", line))]
            assert sizes and abs(sum(sizes) - n_seq * ctx.kv_bytes_per_seq / 2**20) < 0.01, (sizes, n_seq, ctx_size)
