"""The block loop against a ScriptedModel: exact positions unmasked/edited per step, KV calls, stops, MBE.

Test models have B = 4, vocabulary 16, EOS 14, MASK 15. A frame maps block-relative rows to ``(id, p)``;
unlisted rows predict their current token (a masked one predicts 0) with p = 0.01, so they never edit.
"""
from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from dllm_cli.decoding import (
    BlockEvent, DoneEvent, ReferenceModel, ScriptedModel, StartEvent, StepEvent, collect, generate, make_config,
)
from dllm_cli.errors import ContextFullError, UsageError

B, V, EOS, MASK = 4, 16, 14, 15


def frames(*rows: dict[int, tuple[int, float]]) -> Any:
    def script(n: int, tokens: list[int], start: int) -> tuple[list[int], list[float]]:
        assert n < len(rows), f"unexpected forward #{n}"
        ids = [0 if t == MASK else t for t in tokens]
        probs = [0.01] * len(tokens)
        for i, (tok, p) in rows[n].items():
            ids[i], probs[i] = tok, p
        return ids, probs
    return script


def run(script: Any, prompt: list[int], mode: str = "speed", version: str = "2.1", model: ScriptedModel | None = None,
        **kw: Any) -> tuple[list[Any], ScriptedModel]:
    model = model or ScriptedModel(script, n_vocab=V, mask_id=MASK, eos_id=EOS, block_length=B)
    if model.script is not script:
        model.script, model.n_steps = script, 0
    evs = list(generate(model, prompt, make_config(mode, version, **kw),
                        detokenize=lambda ids: "".join(chr(97 + i) for i in ids if i < EOS)))
    return evs, model


def steps(evs: list[Any]) -> list[tuple[int, tuple[int, ...], tuple[tuple[int, int, int], ...]]]:
    return [(e.block, e.unmasked, e.edited) for e in evs if isinstance(e, StepEvent)]


def done(evs: list[Any]) -> DoneEvent:
    assert isinstance(evs[-1], DoneEvent) and isinstance(evs[0], StartEvent)
    return evs[-1]


# prompt [1, 2] shares block 0 with two slots; max_tokens 6 -> blocks 0 and 1
JOINT = frames(
    {2: (5, 0.4), 3: (6, 0.3)},  # none passes 0.5 or 0.7 -> fallback: the most confident mask (2)
    {2: (7, 0.2), 3: (6, 0.6)},  # 3 passes 0.5 (S) but not 0.7 (Q: fallback takes it); 2 differs at p 0.2
    {2: (7, 0.2), 3: (6, 0.9)},  # post step: S agrees -> done; Q still sees 7 at 0.2 <= 0.5 -> done
    {0: (8, 0.9), 1: (9, 0.9), 2: (10, 0.9), 3: (11, 0.9)},  # block 1
    {},
)


def test_speed_mode_exact_steps() -> None:
    evs, m = run(JOINT, [1, 2], "speed", max_tokens=6)
    assert steps(evs) == [(0, (2,), ()), (0, (3,), ((2, 5, 7),)), (0, (), ()), (1, (0, 1, 2, 3), ()), (1, (), ())]
    assert [c["rows"] for c in m.calls] == [(2, 3)] * 3 + [(0, 1, 2, 3)] * 2  # 2.1: every non-prompt row
    assert m.commits == [((1, 2, 7, 6), 0)]  # block 0 once, after finalization; the last block is not committed
    r = done(evs)
    assert r.ids == (7, 6, 8, 9, 10, 11) and r.finish_reason == "length"
    assert (r.forwards, r.commits, r.steps, r.edits, r.tpf) == (5, 1, 5, 1, 6 / 5)
    probs = [e.probs for e in evs if isinstance(e, StepEvent)]
    assert probs[1] == pytest.approx((0.6, 0.2))  # unmasked first, then edited


def test_quality_mode_exact_steps() -> None:
    evs, _ = run(JOINT, [1, 2], "quality", max_tokens=6)
    assert steps(evs) == [(0, (2,), ()), (0, (3,), ()), (0, (), ()), (1, (0, 1, 2, 3), ()), (1, (), ())]
    assert done(evs).ids == (5, 6, 8, 9, 10, 11)


def test_threshold_mode_2_0_schedule_and_mask_rows_only() -> None:
    script = frames({1: (4, 0.96), 2: (5, 0.5), 3: (6, 0.97), 0: (9, 0.99)},
                    {2: (7, 0.1), 1: (13, 0.99)},  # 1 is decoded: 2.0 never edits (and never asks for it)
                    *[{0: (8, 0.2), 1: (9, 0.3), 2: (10, 0.1), 3: (11, 0.4)}] * 4)
    evs, m = run(script, [1], "quality", "2.0", max_tokens=7)  # 0.95; schedule [1, 1, 1, 1]
    assert steps(evs) == [(0, (1, 3), ()), (0, (2,), ()), (1, (3,), ())] + [(1, (1,), ()), (1, (0,), ()), (1, (2,), ())]
    assert [c["rows"] for c in m.calls[:2]] == [(1, 2, 3), (2,)]
    assert done(evs).ids[:3] == (4, 7, 6)

    evs, _ = run(script, [1], "quality", "2.0", max_tokens=7, steps=2)  # schedule [2, 2]
    assert steps(evs)[2:] == [(1, (1, 3), ()), (1, (0, 2), ())]


def test_threshold_is_strict_at_exactly_the_threshold() -> None:
    evs, _ = run(frames({2: (5, 0.5), 3: (6, 0.5)}, {3: (6, 0.5)}, {}), [1, 2], "speed", max_tokens=2)
    assert steps(evs) == [(0, (2,), ()), (0, (3,), ()), (0, (), ())]


def test_post_edit_budget() -> None:
    flip = [{0: (5, 0.9), 1: (6, 0.9), 2: (7, 0.9), 3: (8, 0.9)}] + [{0: (5 + n % 2, 0.9)} for n in range(1, 9)]
    evs, m = run(frames(*flip), [], "speed", max_tokens=4, max_post_steps=3)
    assert steps(evs) == [(0, (0, 1, 2, 3), ()), (0, (), ((0, 5, 6),)), (0, (), ((0, 6, 5),)), (0, (), ((0, 5, 6),))]
    assert m.n_steps == 4 and done(evs).ids == (6, 6, 7, 8)  # the 4th post forward is never run


def test_editing_threshold_zero_edits_any_differing_argmax_and_editing_off_does_not() -> None:
    script = frames({0: (5, 0.9), 1: (6, 0.9), 2: (7, 0.9), 3: (8, 0.9)}, {1: (9, 1e-6)}, {})
    evs, _ = run(script, [], "speed", max_tokens=4)
    assert steps(evs) == [(0, (0, 1, 2, 3), ()), (0, (), ((1, 6, 9),)), (0, (), ())]
    evs, m = run(script, [], "speed", max_tokens=4, editing=False)
    assert steps(evs) == [(0, (0, 1, 2, 3), ())] and m.n_steps == 1


def test_eos_stops_after_the_completing_block() -> None:
    script = frames({}, {0: (3, 0.9), 1: (EOS, 0.9), 2: (5, 0.9), 3: (6, 0.9)}, {})
    evs, m = run(lambda n, t, s: script(n + 1, t, s), [1, 2, 3, 4], "speed", max_tokens=12)
    r = done(evs)
    assert r.ids == (3, EOS) and r.finish_reason == "eos" and r.text == "d"
    assert {e.block for e in evs if isinstance(e, StepEvent)} == {1}
    assert m.commits == [((1, 2, 3, 4), 0)]  # prompt only: the final block is not committed
    blocks = [e for e in evs if isinstance(e, BlockEvent)]
    assert [(b.block, b.ids, b.text) for b in blocks] == [(1, (3, EOS), "d")]


def test_stop_ids_and_eos_edited_away() -> None:
    script = frames({0: (EOS, 0.9)},  # EOS unmasked at step 0 ...
                    {0: (3, 0.9), 1: (4, 0.9), 2: (5, 0.9), 3: (6, 0.9)},  # ... edited away at step 1
                    {}, {0: (13, 0.9), 1: (5, 0.9), 2: (5, 0.9), 3: (5, 0.9)}, {})
    evs, _ = run(script, [], "speed", max_tokens=8)
    assert steps(evs)[:2] == [(0, (0,), ()), (0, (1, 2, 3), ((0, EOS, 3),))]
    assert done(evs).finish_reason == "length" and done(evs).ids == (3, 4, 5, 6, 13, 5, 5, 5)  # kept going
    evs, _ = run(script, [], "speed", max_tokens=8, stop_ids=(13,))
    assert done(evs).ids == (3, 4, 5, 6, 13) and done(evs).finish_reason == "eos"


def test_prompt_tail_is_never_requested_written_or_edited() -> None:
    script = frames({0: (9, 0.99), 1: (9, 0.99), 2: (5, 0.9), 3: (6, 0.9)}, {0: (9, 0.99), 1: (9, 0.99)})
    evs, m = run(lambda n, t, s: script(n, t, s), [1, 2, 3, 4, 5, 6], "speed", max_tokens=2)
    assert [c["rows"] for c in m.calls] == [(2, 3), (2, 3)]
    assert all(e.canvas[:2] == (5, 6) for e in evs if isinstance(e, StepEvent))
    assert done(evs).ids == (5, 6)


def test_mask_logit_is_never_chosen_with_sampling() -> None:
    def logits(n: int, tokens: list[int], start: int) -> np.ndarray:
        lg = np.zeros((len(tokens), V))
        lg[:, MASK] = 50.0  # the mask token dominates the raw logits
        lg[:, 3] = 10.0
        return lg
    model = ScriptedModel(logits, n_vocab=V, mask_id=MASK, eos_id=EOS, block_length=B)
    evs, m = run(logits, [], "speed", model=model, max_tokens=4, temperature=0.5, seed=1)
    assert all(c["want_logits"] for c in m.calls)
    assert done(evs).ids == (3, 3, 3, 3)
    assert steps(evs)[0] == (0, (0, 1, 2, 3), ())


def test_a_mask_top1_from_the_runtime_is_never_written() -> None:
    script = frames({0: (MASK, 0.99), 1: (5, 0.3), 2: (6, 0.2), 3: (7, 0.1)},
                    {0: (4, 0.9), 1: (MASK, 0.99), 2: (6, 0.9), 3: (7, 0.9)}, {})
    evs, _ = run(script, [], "speed", max_tokens=4)
    assert steps(evs) == [(0, (1,), ()), (0, (0, 2, 3), ()), (0, (), ())]  # no unmask to, no edit into MASK
    assert done(evs).ids == (4, 5, 6, 7)


def test_sampling_is_reproducible_with_a_seed() -> None:
    def logits(n: int, tokens: list[int], start: int) -> np.ndarray:
        return np.random.default_rng(n).standard_normal((len(tokens), V))
    def once(seed: int) -> list[Any]:
        model = ScriptedModel(logits, n_vocab=V, mask_id=MASK, eos_id=EOS, block_length=B)
        evs, _ = run(logits, [], "speed", model=model, max_tokens=8, temperature=1.0, top_k=8, seed=seed,
                     max_post_steps=2)
        return [(e.canvas, e.probs) for e in evs if isinstance(e, StepEvent)]
    assert once(7) == once(7)
    assert once(7) != once(8)


def test_prefix_reuse_rolls_back_and_commits_once() -> None:
    fill = lambda n, t, s: ([3 if x == MASK else x for x in t], [0.9] * len(t))  # noqa: E731
    evs, m = run(fill, [1, 2, 3, 4, 5], "speed", max_tokens=7)  # blocks 1, 2; block 1 committed
    assert m.commits == [((1, 2, 3, 4), 0), ((5, 3, 3, 3), 4)] and evs[0].reused == 0
    m.commits.clear()
    evs, m = run(fill, [1, 2, 3, 4, 5, 3, 9, 9, 9, 9], "speed", model=m, max_tokens=2)  # agrees on 6 -> keep 4
    assert m.rollbacks == [4] and m.commits[0] == ((5, 3, 9, 9), 4) and evs[0].reused == 4
    m.commits.clear()
    evs, m = run(fill, [1, 2, 3, 4, 5, 3], "speed", model=m, max_tokens=2)  # shorter: keep floor(6/4)*4 = 4
    assert m.rollbacks == [4, 4] and m.commits == [] and evs[0].reused == 4


def test_context_full_is_raised_before_any_decode() -> None:
    m = ScriptedModel(frames(), n_vocab=V, mask_id=MASK, eos_id=EOS, block_length=B, n_ctx=8, cached=[1, 2, 7, 7])
    with pytest.raises(ContextFullError, match="--max-tokens") as e:
        generate(m, [1, 2, 3, 4, 5], make_config("speed", "2.1", max_tokens=4))  # raised eagerly
    assert "--ctx-size" in str(e.value) and (m.calls, m.commits, m.rollbacks) == ([], [], [])


def test_block_length_mismatch_is_a_usage_error() -> None:
    m = ScriptedModel(frames(), block_length=B)
    with pytest.raises(UsageError, match="--block-length"):
        generate(m, [1], make_config("speed", "2.1", block_length=8))


def test_max_tokens_truncates_inside_a_block() -> None:
    fill = lambda n, t, s: ([s + i for i in range(len(t))], [0.9] * len(t))  # noqa: E731
    evs, m = run(fill, [1, 2], "speed", max_tokens=3)
    r = done(evs)
    assert r.ids == (2, 3, 4) and r.finish_reason == "length"  # block 1 decoded whole, output cut to 1 token
    assert [b.ids for b in evs if isinstance(b, BlockEvent)] == [(2, 3), (4,)]
    assert collect(iter(evs)) == r


def test_text_holds_back_incomplete_utf8() -> None:
    fill = lambda n, t, s: ([s + i for i in range(len(t))], [0.9] * len(t))  # noqa: E731
    m = ScriptedModel(fill, n_vocab=V, mask_id=MASK, eos_id=EOS, block_length=B)
    detok = lambda ids: "".join("\ufffd" if i == 3 else chr(97 + i) for i in ids)  # noqa: E731
    evs = list(generate(m, [], make_config("speed", "2.1", max_tokens=12, editing=False), detokenize=detok))
    texts = [b.text for b in evs if isinstance(b, BlockEvent)]
    assert texts == ["abc", "\ufffdefgh", "ijkl"] and done(evs).text == "abc\ufffdefghijkl"


def test_mbe_commits_blocks_only_when_they_leave_the_window() -> None:
    def script(n: int, tokens: list[int], start: int) -> tuple[list[int], list[float]]:
        ids = [(start + i) % 8 for i in range(len(tokens))]
        if len(tokens) > B:  # a window: the newer block makes the model revise the first slot of the oldest
            ids[0] = 9
        return ids, [0.9] * len(tokens)
    committed_at_step: list[int] = []
    m = ScriptedModel(script, n_vocab=V, mask_id=MASK, eos_id=EOS, block_length=B)
    canvas = [1, 2, 3, 4] + [MASK] * 12
    for ev in generate(m, [1, 2, 3, 4], make_config("speed", "2.1", max_tokens=12, mbe=1)):
        if isinstance(ev, StepEvent):
            canvas[ev.start:ev.start + len(ev.canvas)] = ev.canvas
            assert m.cached == canvas[:len(m.cached)]  # nothing committed is stale
            committed_at_step.append(len(m.cached))
        last = ev
    assert [(c["start"], len(c["tokens"]), c["attn_block"]) for c in m.calls] == \
        [(4, 4, None)] * 2 + [(4, 8, 0)] * 2 + [(8, 8, 0)] * 2
    assert m.commits == [((1, 2, 3, 4), 0), ((9, 5, 6, 7), 4)]
    assert m.cached == canvas[:8] and set(committed_at_step) == {4, 8}
    assert last.ids == (9, 5, 6, 7, 9, 1, 2, 3, 4, 5, 6, 7) and last.edits == 2


def test_reference_model_adapter_matches_an_uncached_forward() -> None:
    from dllm_cli.demo.checkpoint import random_weights, tiny_config
    from dllm_cli.reference import RefModel, config_from_hf, hf_to_weights
    hf = tiny_config(vocab_size=24)
    w = random_weights(hf, seed=0, head_scale=3.0)
    cfg = config_from_hf(hf, block_length=B, mask_id=23)
    ref = RefModel(cfg, hf_to_weights(lambda n, dt: w[n].astype(dt), set(w), cfg, np.float64))
    model = ReferenceModel(ref, eos_id=22)
    prompt = [1, 2, 3, 4, 5, 6]
    evs = list(generate(model, prompt, make_config("speed", "2.1", max_tokens=6)))
    first = next(e for e in evs if isinstance(e, StepEvent))
    window = prompt + [23, 23]
    full = ref.forward(window)[4:8].copy()  # [4, V] no cache, block-causal
    full[:, 23] = -np.inf
    assert first.unmasked and all(first.canvas[i] == int(full[i].argmax()) for i in first.unmasked)
    assert model.cached == prompt + list(done(evs).ids[:2])  # prompt block + block 1; the last block stays out
    assert model.cache.n_past == 8
    model = ReferenceModel(ref, eos_id=22)  # MBE: windows forwarded with attn_block=0 ("full" in the reference)
    evs = list(generate(model, prompt, make_config("speed", "2.1", max_tokens=10, mbe=1)))
    out = list(done(evs).ids)
    assert len(out) == 10 or out[-1] == 22
    assert model.cached == (prompt + out)[:len(model.cached)] and model.cache.n_past == len(model.cached) == 8
