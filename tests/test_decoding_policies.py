"""Decoding policies, sampling, config and events in isolation (no engine): exact selections for fixed inputs."""
from __future__ import annotations

import json

import numpy as np
import pytest

from dllm_cli.decoding import (
    BlockEvent, DecodeConfig, DoneEvent, JointPolicy, StartEvent, StepEvent, StepOutput, ThresholdPolicy,
    event_from_dict, filtered_probs, make_config, make_policy, make_sampler, top2_from_logits, transfer_schedule,
)
from dllm_cli.decoding.threshold import threshold_m2t
from dllm_cli.errors import UsageError
from dllm_cli.registry import Preset

MASK = 15


def sel(mask: np.ndarray) -> list[int]:
    return np.flatnonzero(mask).tolist()


def arr(*v: float) -> np.ndarray:
    return np.array(v, dtype=np.float64)


# --- 2.0 threshold -----------------------------------------------------------------------------------------

def test_transfer_schedule_gives_the_remainder_to_early_steps() -> None:
    assert transfer_schedule(32, 32) == [1] * 32
    assert transfer_schedule(10, 4) == [3, 3, 2, 2]
    assert transfer_schedule(4, 6) == [1, 1, 1, 1, 0, 0]


def test_threshold_is_strict_and_falls_back_to_the_most_confident() -> None:
    act = np.array([True, True, True, False])
    p = arr(0.5, 0.6, 0.5, 0.99)  # position 3 is not a mask: never selected
    assert sel(threshold_m2t(p, act, 0.5, 1)) == [1]
    assert sel(threshold_m2t(arr(0.5, 0.5, 0.4, 0.99), act, 0.5, 1)) == [0]  # exactly 0.5 fails; tie -> lower pos
    assert sel(threshold_m2t(arr(0.2, 0.1, 0.3, 0.99), act, 0.5, 2)) == [0, 2]


def test_threshold_policy_uses_the_schedule_and_never_edits() -> None:
    pol = ThresholdPolicy(threshold=0.95, block_length=4, steps=2)  # schedule [2, 2]
    pol.begin_block()
    act = np.array([False, True, True, True])
    old = np.array([7, MASK, MASK, MASK])
    x0 = np.array([3, 4, 5, 6])  # a differing argmax at the decoded position 0
    m2t, t2t = pol.select(x0, arr(0.99, 0.96, 0.5, 0.97), act, ~act, old)
    assert sel(m2t) == [1, 3] and not t2t.any()
    m2t, _ = pol.select(x0, arr(0.99, 0.3, 0.2, 0.4), act, ~act, old)  # 0 pass, need 2 -> top-2
    assert sel(m2t) == [1, 3]
    assert not pol.proceed(1)  # schedule exhausted
    pol.begin_block()
    assert pol.proceed(1) and not pol.proceed(0)


# --- 2.1 joint ---------------------------------------------------------------------------------------------

def joint(threshold: float, editing_threshold: float, max_post_steps: int = 16, editing: bool = True) -> JointPolicy:
    pol = JointPolicy(threshold=threshold, editing_threshold=editing_threshold, max_post_steps=max_post_steps,
                      editing=editing)
    pol.begin_block()
    return pol


OLD = np.array([1, 2, 3, MASK, MASK])  # position 0 is the prompt tail
ACT = OLD == MASK
EDITABLE = np.array([False, True, True, False, False])
X0 = np.array([9, 8, 3, 5, 6])  # argmax differs at 0 (prompt), 1; agrees at 2


def test_speed_mode_edits_every_differing_argmax_even_at_tiny_probability() -> None:
    m2t, t2t = joint(0.5, 0.0).select(X0, arr(0.99, 1e-6, 0.9, 0.4, 0.45), ACT, EDITABLE, OLD)
    assert sel(m2t) == [4]  # fallback: the most confident mask
    assert sel(t2t) == [1]  # 0 is prompt, 2 agrees


def test_quality_mode_edit_threshold_is_strict() -> None:
    pol = joint(0.7, 0.5)
    m2t, t2t = pol.select(X0, arr(0.99, 0.5, 0.9, 0.71, 0.8), ACT, EDITABLE, OLD)
    assert sel(m2t) == [3, 4] and sel(t2t) == []
    _, t2t = pol.select(X0, arr(0.99, 0.51, 0.9, 0.71, 0.8), ACT, EDITABLE, OLD)
    assert sel(t2t) == [1]


def test_post_edit_budget_is_checked_before_the_forward() -> None:
    pol = joint(0.5, 0.0, max_post_steps=2)
    assert pol.proceed(3)
    assert pol.proceed(0) and pol.proceed(0)  # post = 1, 2
    assert not pol.proceed(0)  # post = 3 > 2
    assert not pol.block_done(had_masks=False, edited=True) and pol.block_done(had_masks=False, edited=False)
    assert not pol.block_done(had_masks=True, edited=False)  # the step that fills the last masks never ends it


def test_editing_off_is_pure_m2t() -> None:
    pol = joint(0.5, 0.0, editing=False)
    m2t, t2t = pol.select(X0, arr(0.99, 0.9, 0.9, 0.6, 0.7), ACT, EDITABLE, OLD)
    assert sel(m2t) == [3, 4] and not t2t.any() and not pol.edits
    assert pol.proceed(1) and not pol.proceed(0)


def test_make_policy_picks_by_version_and_editing() -> None:
    pol = make_policy(make_config("quality", "2.0", max_tokens=2), 4)
    assert isinstance(pol, ThresholdPolicy) and pol.schedule == [2, 2]  # steps = min(B, max_tokens)
    assert isinstance(make_policy(make_config("speed", "2.1"), 4), JointPolicy)
    assert make_policy(make_config("speed", "2.0", editing=True), 4).edits


# --- config ------------------------------------------------------------------------------------------------

def test_presets_from_registry_gguf_and_overrides() -> None:
    s, q = make_config("speed", "2.1"), make_config("quality", "2.1")
    assert (s.threshold, s.editing_threshold, s.max_post_steps, s.editing) == (0.5, 0.0, 16, True)
    assert (q.threshold, q.editing_threshold, q.max_post_steps, q.editing) == (0.7, 0.5, 16, True)
    gguf = {"speed": Preset(0.6, 0.1, 8, True), "quality": {"threshold": 0.8, "editing_threshold": 0.6,
                                                            "max_post_steps": 4, "editing": True}}
    assert make_config("speed", "2.1", gguf).max_post_steps == 8
    assert make_config("quality", "2.1", gguf, threshold=0.9, top_k=None).threshold == 0.9
    assert make_config("quality", "2.1", gguf).editing_threshold == 0.6


def test_editing_on_a_2_0_model_warns_but_obeys() -> None:
    assert not make_config("speed", "2.0").editing and make_config("speed", "2.0").warnings == ()
    c = make_config("speed", "2.0", editing=True)
    assert c.editing and "2.0" in c.warnings[0]


@pytest.mark.parametrize("bad, word", [
    (dict(threshold=1.5), "--threshold"), (dict(editing_threshold=-0.1), "--editing-threshold"),
    (dict(top_p=0.0), "--top-p"), (dict(top_p=1.1), "--top-p"), (dict(top_k=-1), "--top-k"),
    (dict(temperature=-1.0), "--temperature"), (dict(max_post_steps=-1), "--max-post-steps"),
    (dict(block_length=0), "--block-length"), (dict(max_tokens=0), "--max-tokens"), (dict(steps=0), "--steps"),
    (dict(bogus=1), "bogus"),
])
def test_config_validation(bad: dict, word: str) -> None:
    with pytest.raises(UsageError, match=word) as e:
        make_config("speed", "2.1", **bad)
    assert "\n" not in str(e.value)


def test_unknown_mode() -> None:
    with pytest.raises(UsageError, match="unknown mode"):
        make_config("fast", "2.1")
    with pytest.raises(UsageError, match="unknown mode"):
        DecodeConfig(mode="fast")


# --- sampling ----------------------------------------------------------------------------------------------

def test_top2_from_logits_excludes_the_mask_and_renormalises() -> None:
    lg = np.log(np.array([[0.1, 0.2, 0.3, 0.4]]))  # mask = 3 has the highest logit
    out = top2_from_logits(lg, mask_id=3)
    assert out.ids.tolist() == [[2, 1]]
    np.testing.assert_allclose(out.probs, [[0.5, 1 / 3]], rtol=1e-6)


def test_filters_top_k_top_p_and_mask() -> None:
    lg = np.log(np.array([[0.05, 0.5, 0.3, 0.15]]))
    assert sel(filtered_probs(lg, 0, temperature=1.0, top_k=2)[0] > 0) == [1, 2]
    assert sel(filtered_probs(lg, 3, temperature=1.0, top_p=0.6)[0] > 0) == [1, 2]  # 0.59 < 0.6: keeps the crossing token
    assert sel(filtered_probs(lg, 3, temperature=1.0, top_p=0.01)[0] > 0) == [1]  # first token always kept
    np.testing.assert_allclose(filtered_probs(lg, 3, temperature=1.0)[0], [0.05 / 0.85, 0.5 / 0.85, 0.3 / 0.85, 0])


def test_sampling_is_deterministic_for_a_seed_and_reports_the_filtered_probability() -> None:
    lg = np.random.default_rng(0).standard_normal((6, 8)).astype(np.float32)
    out = StepOutput(ids=np.zeros((6, 2), np.int32), probs=np.zeros((6, 2), np.float32), logits=lg)
    s = make_sampler(temperature=0.7, top_k=5, top_p=0.9)
    a = s(out, np.random.default_rng(7), 3)
    b = s(out, np.random.default_rng(7), 3)
    assert a[0].tolist() == b[0].tolist() and 3 not in a[0].tolist()
    ref = filtered_probs(lg, 3, temperature=0.7, top_k=5, top_p=0.9)
    np.testing.assert_allclose(a[1], ref[np.arange(6), a[0]])
    greedy = make_sampler()
    assert not greedy.needs_logits and s.needs_logits


# --- events ------------------------------------------------------------------------------------------------

def test_events_round_trip_through_json() -> None:
    evs = [StartEvent(5, 4, 4, MASK, 1, 3, make_config("speed", "2.1").to_dict()),
           StepEvent(1, 0, 4, (5, 6, MASK, 7), (1, 3), ((0, 5, 6),), (0.9, 0.8, 0.1), 1, 1, 1, 0.01),
           BlockEvent(1, (6, 7), "ab", 2, 0.02), DoneEvent((6, 7), "ab", 5, "length", 2, 1, 2, 1, 1.0, 0.03, 4)]
    for ev in evs:
        assert event_from_dict(json.loads(json.dumps(ev.to_dict()))) == ev
