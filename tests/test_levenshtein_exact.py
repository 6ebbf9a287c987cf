"""LLaDA2.2 Levenshtein decoding is exact (issue 14).

* An independent port of spec §5.5, a straight loop in this file that recomputes the whole window with the numpy
  reference at every step (no KV cache), gives the engine's ids for several prompts and thresholds.
* The engine on the patched runtime (f32 GGUF, f32 KV) and on the numpy reference give identical ids and identical
  step events (unmask, substitute, delete, insert, truncation), probabilities within 1e-4.

The tiny 2.2 checkpoint's DELETE/SPLIT output rows are scaled by 3 so that a random model writes them often.
"""
from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest

from converters import convert
from dllm_cli.decoding import ReferenceModel, StepEvent, collect, generate, make_config
from dllm_cli.reference import load_gguf, load_hf
from runtime_marks import needs_runtime
from test_llada22 import write_llada22

MAX_STEPS = 1000


@pytest.fixture(scope="module")
def tiny22(tmp_path_factory):
    d = tmp_path_factory.mktemp("lev")
    cfg = write_llada22(d / "ckpt", edit_boost=3.0)
    return d, cfg, (cfg["delete_token_id"], cfg["split_token_id"])


def ranked(logits: np.ndarray, mask: int) -> tuple[np.ndarray, np.ndarray]:
    """Ids of each row by decreasing probability (mask excluded; ties: lower id) and the probabilities."""
    lg = np.array(logits, dtype=np.float64)
    lg[:, mask] = -np.inf
    e = np.exp(lg - lg.max(axis=1, keepdims=True))
    prob = e / e.sum(axis=1, keepdims=True)
    return np.argsort(-prob, axis=1, kind="stable"), prob


def port(ref, prompt, *, B, threshold, edit_threshold, max_post, steps, max_tokens, mask, dele, split, stops):
    """Spec §5.5 written out plainly, greedy, the whole window recomputed each step: (ids, block after each step)."""
    trace: list = []
    P = len(prompt)
    n_blocks = math.ceil((P + max_tokens) / B)
    x = list(prompt) + [mask] * (n_blocks * B - P)
    for k in range(P // B, n_blocks):
        s0 = k * B
        blk = x[s0:s0 + B]
        in_prompt = [s0 + j < P for j in range(B)]
        orig = [blk[j] == mask and not in_prompt[j] for j in range(B)]
        n0, step, post, seen = sum(orig), 0, 0, []
        while True:
            maskpos = [blk[j] == mask and not in_prompt[j] for j in range(B)]
            n_orig = sum(1 for j in range(B) if maskpos[j] and orig[j])
            n_new = sum(maskpos) - n_orig
            post = post + 1 if n_orig == 0 else 0
            order, prob = ranked(ref.forward(np.array(x[:s0] + blk))[s0:s0 + B], mask)
            top1, top2 = order[:, 0], order[:, 1]
            p = [prob[j, top1[j]] for j in range(B)]
            m2t = set()
            if any(maskpos):
                cand = [j for j in range(B) if maskpos[j]]
                need = n0 // steps + (1 if step < n0 % steps else 0) + n_new
                high = [j for j in cand if p[j] > threshold]
                if step >= steps:
                    m2t = set(cand)
                elif len(high) >= need:
                    m2t = set(high)
                else:
                    m2t = set(sorted(cand, key=lambda j: (-p[j], j))[:min(need, len(cand))])
            t2t = {j for j in range(B) if not maskpos[j] and not in_prompt[j] and p[j] > edit_threshold
                   and top1[j] != blk[j]}
            if max_post > 0:
                final = post >= max_post
            else:
                final = n_orig > 0 and all(j in m2t for j in range(B) if maskpos[j] and orig[j])
            final = final or step >= MAX_STEPS - 1
            write = {j: int(top1[j]) for j in range(B)}
            if final:
                m2t = {j for j in range(B) if maskpos[j]}
                for j in m2t | t2t:
                    if write[j] in (dele, split):
                        write[j] = int(next(t for t in order[j] if t not in (dele, split, mask)))
            new = [write[j] if j in m2t | t2t else blk[j] for j in range(B)]
            if not final and new in seen:
                changed = sorted((j for j in range(B) if new[j] != blk[j]), key=lambda j: (p[j], j))
                for j in changed:
                    trial = list(new)
                    trial[j] = int(top2[j]) if new[j] == top1[j] else int(top1[j])
                    if trial not in seen:
                        new = trial
                        trace.append("anti-loop")
                        break
            seen.append(new)
            out, trk = [], []
            for j in range(B):
                if in_prompt[j]:
                    out.append(blk[j]); trk.append(False)
                elif new[j] == dele:
                    pass
                elif new[j] == split:
                    out += [mask, blk[j]]; trk += [False, orig[j]]
                else:
                    out.append(new[j]); trk.append(orig[j])
            out, trk = (out + [mask] * B)[:B], (trk + [False] * B)[:B]
            done = final or (not any(maskpos) and new == blk)
            blk, orig, step = out, trk, step + 1
            trace.append(tuple(blk))
            if done:
                break
        x[s0:s0 + B] = blk
        gen = x[P:min(s0 + B, P + max_tokens)]
        if any(t in stops for t in gen):
            break
    gen = x[P:P + max_tokens]
    for i, t in enumerate(gen):
        if t in stops:
            return gen[:i + 1], trace
    return gen, trace


SETTINGS = [dict(threshold=0.5, editing_threshold=0.0, max_post_steps=16),
            dict(threshold=0.9, editing_threshold=0.5, max_post_steps=16),
            dict(threshold=0.3, editing_threshold=0.2, max_post_steps=4),
            dict(threshold=0.6, editing_threshold=0.1, max_post_steps=0)]


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: f"{s['threshold']}-{s['editing_threshold']}-{s['max_post_steps']}")
def test_the_engine_matches_an_independent_port_of_the_pseudo_code(tiny22, setting):
    d, cfg, (dele, split) = tiny22
    ref = load_hf(d / "ckpt", np.float64)
    stops = {cfg["eos_token_id"]}
    rng = np.random.default_rng(13)
    fired = [0, 0, 0]
    for n in (3, 45):
        prompt = [int(t) for t in rng.integers(0, 250, size=n)]
        config = make_config("speed", "2.2", max_tokens=40, **setting)
        evs = list(generate(ReferenceModel(ref, eos_id=cfg["eos_token_id"], edit_ids=(dele, split)), prompt, config))
        done = collect(evs)
        want, trace = port(ref, prompt, B=32, threshold=setting["threshold"], edit_threshold=setting["editing_threshold"],
                    max_post=setting["max_post_steps"], steps=32, max_tokens=40, mask=ref.cfg.mask_id, dele=dele,
                    split=split, stops=stops)
        assert list(done.ids) == want, f"prompt of {n} tokens"
        fired[2] += trace.count("anti-loop")
        states = [t for t in trace if t != "anti-loop"]
        assert [e.canvas for e in evs if isinstance(e, StepEvent)] == states, "every step's block must agree"
        assert dele not in done.ids and split not in done.ids
        fired[0] += done.inserts
        fired[1] += done.deletes
    assert fired[0] > 0 and fired[1] > 0, "inserts and deletes must both fire for the comparison to mean anything"
    if setting["threshold"] in (0.5, 0.9):
        assert fired[2] > 0, "the anti-loop rule must fire too"


def events(evs):
    return [(e.block, e.step, e.canvas, e.unmasked, e.edited, e.deleted, e.inserted, e.truncated, e.forwards,
             e.mask_count) for e in evs if isinstance(e, StepEvent)]


@needs_runtime
@pytest.mark.parametrize("mode", ["speed", "quality"])
def test_runtime_and_reference_engines_give_identical_ids_and_events(tiny22, mode):
    from dllm_cli.runtime import options
    from dllm_cli.runtime.model import Model
    from dllm_cli.runtime.session import Session

    d, cfg, edit_ids = tiny22
    path = d / "tiny22-f32.gguf"
    if not path.exists():
        convert(d / "ckpt", path, outtype="f32")
    exact = replace(options.EXACT, ctx_size=512, threads=2)
    ref = load_gguf(path, np.float64)
    rng = np.random.default_rng(5)
    totals = [0, 0, 0]
    with Model(path, exact) as model:
        assert model.edit_ids == edit_ids
        for n in (7, 40):
            prompt = [int(t) for t in rng.integers(0, 250, size=n)]
            config = make_config(mode, "2.2", max_tokens=48, stop_ids=model.stop_ids)
            with Session(model, exact) as session:
                got = list(generate(session, prompt, config))
            want = list(generate(ReferenceModel(ref, eos_id=model.eos_id, n_ctx=512, edit_ids=edit_ids), prompt,
                                 config))
            assert events(got) == events(want)
            for a, b in zip((e for e in got if isinstance(e, StepEvent)), (e for e in want if isinstance(e, StepEvent))):
                assert np.allclose(a.probs, b.probs, atol=1e-4)
            a, b = collect(got), collect(want)
            assert (a.ids, a.forwards, a.edits, a.inserts, a.deletes) == (b.ids, b.forwards, b.edits, b.inserts,
                                                                          b.deletes)
            totals = [totals[0] + a.inserts, totals[1] + a.deletes, totals[2] + a.edits]
    assert all(totals), f"inserts, deletes and substitutions must all fire: {totals}"
