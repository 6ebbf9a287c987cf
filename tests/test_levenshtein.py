"""LLaDA2.2 Levenshtein decoding (issue 14): ``apply_edit_ops`` and the policy on scripted outputs, exact step by step.

Scripted model: block length 4, vocabulary 16, MASK 15, EOS 14, DELETE 12, SPLIT 13. A frame's second choice
is ``top1 + 1`` (``ScriptedModel``), unless the frame is a logits array.
"""
from __future__ import annotations

import numpy as np
import pytest

from dllm_cli.decoding import ScriptedModel, StepEvent, collect, event_from_dict, generate, make_config
from dllm_cli.decoding.levenshtein import LevenshteinPolicy, apply_edit_ops
from dllm_cli.errors import UsageError

M, EOS, DEL, SPL, V = 15, 14, 12, 13, 16


def scripted(frames, B: int = 4) -> ScriptedModel:
    return ScriptedModel(frames, n_vocab=V, mask_id=M, eos_id=EOS, block_length=B, edit_ids=(DEL, SPL))


def decode(model, prompt, mode: str = "speed", **cfg):
    cfg.setdefault("max_tokens", len(prompt) and model.block_length - len(prompt) % model.block_length)
    events = list(generate(model, prompt, make_config(mode, "2.2", **cfg)))
    return [e for e in events if isinstance(e, StepEvent)], events[-1]


def f(*ids, p=0.9):
    """A frame: top-1 ids for the whole call, each with probability ``p`` (or a list of them)."""
    probs = p if isinstance(p, list) else [p] * len(ids)
    return list(ids), probs


def logits_frame(rows: list[tuple[int, ...]]) -> np.ndarray:
    """Logits whose ranking per row is the given ids (first = top-1), everything else far below."""
    lg = np.full((len(rows), V), -20.0)
    for r, ranked in enumerate(rows):
        for rank, t in enumerate(ranked):
            lg[r, t] = 5.0 - 2.0 * rank
    return lg


# --- apply_edit_ops --------------------------------------------------------------------------------------------

def ops(new, old, orig=None, prompt=None):
    n = len(new)
    return apply_edit_ops(np.array(new), np.array(old), np.array(orig or [False] * n),
                          np.array(prompt or [False] * n), mask_id=M, delete_id=DEL, split_id=SPL)


def test_delete_shifts_left_and_pads_a_new_mask():
    r = ops([1, DEL, 3, 4], [1, 2, 3, 4], orig=[False, True, True, True])
    assert r.block.tolist() == [1, 3, 4, M] and r.is_orig.tolist() == [False, True, True, False]
    assert r.deleted == ((1, 1, 2),) and r.after.tolist() == [0, -1, 1, 2] and r.truncated == ()


def test_insert_opens_a_mask_before_the_pre_write_token_and_truncates():
    r = ops([1, SPL, 3, 4], [1, 2, 3, 4], orig=[True, True, True, True])
    assert r.block.tolist() == [1, M, 2, 3] and r.truncated == (4,)  # SPLIT keeps the token it was written over
    assert r.is_orig.tolist() == [True, False, True, True] and r.inserted == ((1, 1),)
    assert r.after.tolist() == [0, 2, 3, -1]


def test_insert_at_the_block_end_pushes_the_last_token_out():
    r = ops([1, 2, 3, SPL], [1, 2, 3, 4])
    assert r.block.tolist() == [1, 2, 3, M] and r.truncated == (4,) and r.inserted == ((3, 3),)


def test_prompt_positions_are_copied_whatever_was_written():
    r = ops([DEL, SPL, DEL, 9], [7, 8, 5, 6], prompt=[True, True, False, False])
    assert r.block.tolist() == [7, 8, 9, M] and r.deleted == ((2, 2, 5),) and r.inserted == ()


# --- the policy through the engine -----------------------------------------------------------------------------

def test_a_delete_closes_up_and_the_pulled_in_mask_is_unmasked_next():
    m = scripted([f(0, 5, 6, 7), f(0, 5, DEL, 7, p=[0, .9, .8, .9]), f(0, 5, 7, 8, p=[0, .9, .9, .1]),
                  f(0, 5, 7, 8)])
    steps, done = decode(m, [1], max_tokens=3)
    assert [s.canvas for s in steps] == [(1, 5, 6, 7), (1, 5, 7, M), (1, 5, 7, 8), (1, 5, 7, 8)]
    assert steps[1].deleted == ((2, 2, 6),) and steps[1].mask_count == 1 and steps[1].probs == pytest.approx([.8])
    assert steps[2].unmasked == (3,)  # p 0.1 < 0.5, yet the schedule floor counts the new mask (n_new = 1)
    assert done.ids == (5, 7, 8) and done.deletes == 1 and done.inserts == 0 and done.edits == 0
    assert done.forwards == 4  # the last step changed nothing: the block ends


def test_an_insert_opens_a_slot_that_is_filled_and_truncation_is_reported():
    m = scripted([f(0, 5, 6, 7), f(0, 5, SPL, 7, p=[0, .9, .7, .9]), f(0, 5, 9, 6), f(0, 5, 9, 6)])
    steps, done = decode(m, [1], max_tokens=3)
    assert steps[1].canvas == (1, 5, M, 6) and steps[1].inserted == ((2, 2),) and steps[1].truncated == (7,)
    assert steps[2].canvas == (1, 5, 9, 6) and steps[2].unmasked == (2,)
    assert done.ids == (5, 9, 6) and done.inserts == 1 and done.deletes == 0


def test_an_insert_at_the_block_end():
    m = scripted([f(0, 5, 6, 7), f(0, 5, 6, SPL), f(0, 5, 6, 8), f(0, 5, 6, 8)])
    steps, done = decode(m, [1], max_tokens=3)
    assert steps[1].canvas == (1, 5, 6, M) and steps[1].inserted == ((3, 3),) and steps[1].truncated == (7,)
    assert done.ids == (5, 6, 8)


def test_substitution_positions_are_reported_after_the_shift():
    m = scripted([f(0, 5, 6, 7), f(0, DEL, 6, 9), f(0, 6, 9, 4), f(0, 6, 9, 4)])
    steps, _ = decode(m, [1], max_tokens=3)
    assert steps[1].canvas == (1, 6, 9, M) and steps[1].deleted == ((1, 1, 5),) and steps[1].edited == ((2, 7, 9),)


def test_prompt_positions_are_never_touched_or_even_read():
    script = lambda n, tokens, start: f(DEL, SPL, *([DEL] * (len(tokens) - 2)), p=.99) if n == 0 else f(*tokens[:2], 5, 6)
    m = scripted(script)
    steps, done = decode(m, [1, 2], max_tokens=2)
    assert all(s.canvas[:2] == (1, 2) for s in steps)
    assert all(0 not in c["rows"] and 1 not in c["rows"] for c in m.calls)
    assert steps[0].deleted == ((2, 2, M), (3, 2, M))  # the two mask slots deleted (pads come back)
    assert done.ids == (5, 6)


def test_anti_loop_switches_the_least_confident_change_to_its_second_choice():
    m = scripted([f(0, 5, 6, 7), f(0, 5, 9, 7, p=[0, .9, .6, .9]), f(0, 5, 6, 7, p=[0, .9, .6, .9]),
                  f(0, 5, 7, 7), f(0, 5, 7, 7)])
    steps, _ = decode(m, [1], max_tokens=3)
    # step 2 would write [1 5 6 7] again (seen at step 0): position 2 takes its top-2 (6 + 1 = 7) instead
    assert steps[2].canvas == (1, 5, 7, 7) and steps[2].edited == ((2, 9, 7),)


def test_the_final_round_fills_every_mask_and_never_writes_an_edit_token():
    # post budget 2: step 1 starts without original masks (post 1) and deletes; step 2 (post 2) is final.
    # There the mask's top-1 is DELETE and its top-2 SPLIT: the step is re-run for logits, top-3 (8) is written.
    frames = [f(0, 5, 6, 7), f(0, 5, 6, DEL), logits_frame([(0,), (5,), (6,), (DEL, SPL, 8)]),
              logits_frame([(0,), (5,), (6,), (DEL, SPL, 8)])]
    m = scripted(frames)
    steps, done = decode(m, [1], max_tokens=3, max_post_steps=2)
    assert steps[2].canvas == (1, 5, 6, 8) and steps[2].unmasked == (3,) and steps[2].deleted == ()
    assert len(steps) == 3 and done.forwards == 4 and m.calls[-1]["want_logits"]  # the re-run counts
    assert DEL not in done.ids and SPL not in done.ids


def test_the_final_round_uses_top_2_without_a_rerun_when_it_is_allowed():
    m = scripted([f(0, 5, 6, 7), f(0, 5, 6, DEL), f(0, 5, 6, SPL)])  # top-2 of SPLIT is 14 (EOS): allowed
    steps, done = decode(m, [1], max_tokens=3, max_post_steps=2)
    assert steps[2].canvas == (1, 5, 6, EOS) and done.forwards == 3 and not any(c["want_logits"] for c in m.calls)


def test_no_indel_keeps_substitution_only():
    m = scripted([f(0, 5, 6, 7), logits_frame([(0,), (5,), (DEL, 9), (7,)]), logits_frame([(0,), (5,), (DEL, 9), (7,)])])
    steps, done = decode(m, [1], max_tokens=3, indel=False)
    assert steps[1].canvas == (1, 5, 9, 7) and steps[1].edited == ((2, 6, 9),)
    assert done.inserts == done.deletes == 0 and done.edits == 1


def test_no_edit_is_m2t_only_and_ends_when_the_masks_are_gone():
    rerun = logits_frame([(0,), (5,), (SPL, DEL, 3), (8,)])
    m = scripted([f(0, 5, SPL, 7, p=[0, .9, .2, .9]), rerun, rerun])
    steps, done = decode(m, [1], max_tokens=3, editing=False)
    assert [s.canvas for s in steps] == [(1, 5, M, 7), (1, 5, 3, 7)]  # SPLIT never written; 7 never edited
    assert done.forwards == 3 and done.edits == done.inserts == 0  # 2 steps + 1 re-run for the top-3


def test_schedule_floor_unmasks_n0_over_steps_per_step():
    m = scripted(lambda n, tokens, start: f(*range(1, len(tokens) + 1), p=.1), B=8)
    steps, _ = decode(m, [], max_tokens=8, steps=2, editing=False)
    assert [len(s.unmasked) for s in steps] == [4, 4]


def test_a_block_is_committed_once_after_its_last_edit():
    frames = [f(0, 5, 6, 7), f(0, 5, DEL, 7), f(0, 5, 7, 8), f(0, 5, 7, 8),  # block 0, then block 1
              f(1, 2, 3, 4), f(1, 2, 3, 4)]
    m = scripted(frames)
    steps, done = decode(m, [1], max_tokens=7)
    assert m.commits == [((1, 5, 7, 8), 0)] and done.ids == (5, 7, 8, 1, 2, 3, 4)


def test_insert_and_delete_events_round_trip():
    m = scripted([f(0, 5, 6, 7), f(0, DEL, SPL, 7), f(0, 9, 9, 9), f(0, 9, 9, 9)])
    steps, done = decode(m, [1], max_tokens=3)
    assert steps[1].deleted and steps[1].inserted
    for ev in (*steps, done):
        assert event_from_dict(ev.to_dict()) == ev


# --- config ----------------------------------------------------------------------------------------------------

def test_22_presets_and_their_refusals():
    speed, quality = make_config("speed", "2.2"), make_config("quality", "2.2")
    assert (speed.threshold, speed.editing_threshold, speed.max_post_steps, speed.indel) == (0.5, 0.0, 16, True)
    assert (quality.threshold, quality.editing_threshold, quality.indel) == (0.9, 0.5, True)
    with pytest.raises(UsageError, match="greedily"):
        make_config("speed", "2.2", temperature=0.7)
    assert make_config("speed", "2.2", temperature=0.7, editing=False).temperature == 0.7
    with pytest.raises(UsageError, match="--indel needs a LLaDA2.2"):
        make_config("speed", "2.1", indel=True)
    with pytest.raises(UsageError, match="mbe"):
        make_config("speed", "2.2", mbe=1)


def test_policy_without_edit_ids_is_a_clear_error():
    from dllm_cli.errors import DecodeError

    m = ScriptedModel([f(0, 5, 6, 7)], n_vocab=V, mask_id=M, eos_id=EOS, block_length=4)
    with pytest.raises(DecodeError, match="DELETE/SPLIT"):
        collect(generate(m, [1], make_config("speed", "2.2", max_tokens=3)))


def test_policy_state_resets_per_block():
    pol = LevenshteinPolicy(threshold=.5, editing_threshold=0, max_post_steps=16, editing=True, indel=True,
                            steps=4, mask_id=M, delete_id=DEL, split_id=SPL)
    pol.begin_block(np.array([1, M, M, M]), np.array([True, False, False, False]))
    assert pol.n0 == 3 and pol.is_orig.tolist() == [False, True, True, True] and not pol.seen


def test_serve_step_view_and_usage_carry_inserts_and_deletes():
    from dllm_cli.serve.backend import step_view
    from dllm_cli.serve.completion import Tally

    m = scripted([f(0, 5, 6, 7), f(0, DEL, SPL, 7), f(0, 9, 9, 9), f(0, 9, 9, 9)])
    steps, done = decode(m, [1], max_tokens=3)
    view = step_view(steps[1], 1, M, lambda t: f"t{t}")
    assert view["deleted"] == [[0, "t5"]] and view["inserted"] == [0] and view["cells"] == [None, "t6", "t7"]
    tally = Tally()
    for ev in (*steps, done):
        tally.update(ev)
    assert (tally.usage()["dllm"]["inserts"], tally.usage()["dllm"]["deletes"]) == (1, 1)


# --- the chat live view ----------------------------------------------------------------------------------------

def _styled(row) -> list[tuple[str, str]]:
    """(text, style) pieces of a Rich Text row."""
    out = []
    for span in sorted(row.spans, key=lambda s: s.start):
        out.append((row.plain[span.start:span.end], str(span.style)))
    return out


def test_live_view_strikes_out_a_deleted_token_and_opens_an_inserted_slot():
    from dllm_cli.cli import live

    m = scripted([f(0, 5, 6, 7), f(0, DEL, SPL, 7), f(0, 9, 9, 9), f(0, 9, 9, 9)])
    evs = list(generate(m, [1], make_config("speed", "2.2", max_tokens=3)))
    clock = iter([0.0, 0.1, 0.2, 0.9, 1.0])  # elapsed_s of the steps, then of the block/done
    view = live.LiveView(piece=lambda t: f" w{t}")
    rows = []
    for ev in evs:
        if isinstance(ev, StepEvent):
            ev = StepEvent(**{**ev.__dict__, "elapsed_s": next(clock)})
            view.update(ev)
            rows.append(_styled(view.block_row()))
        else:
            view.update(ev)
    # step 2: " w5" (deleted, struck out where the row closed up), then the new slot, then the kept tokens
    assert rows[1][:2] == [(" w5", live.DELETE_STYLE), (live.INSERT_CELL, live.INSERT_STYLE)]
    assert "".join(t for t, _ in rows[1]) == " w5" + live.INSERT_CELL
    # step 3 (0.1 s later): both still visible, fainter; the slot is filled (green) and w6, w7 edited
    assert rows[2][0] == (" w5", live.RECENT_DELETE_STYLE) and (" w9", live.NEW_STYLE) in rows[2]
    # step 4 (0.7 s after the delete): gone
    assert all(text != " w5" for text, _ in rows[3])
    assert "1 ins · 1 del" in view.status_line().plain and "1 ins · 1 del" in live.summary_line(evs[-1])


def test_live_view_keeps_a_lingering_edit_on_its_token_across_a_shift():
    from dllm_cli.cli import live

    # step 1 substitutes position 3 (7 -> 8); step 2 deletes position 1: the edit mark moves left with its token
    m = scripted([f(0, 5, 6, 7), f(0, 5, 6, 8, p=[0, .9, .9, .6]), f(0, DEL, 6, 8), f(0, 6, 8, 4), f(0, 6, 8, 4)])
    evs = [e for e in generate(m, [1], make_config("speed", "2.2", max_tokens=3)) if isinstance(e, StepEvent)]
    view = live.LiveView(piece=lambda t: f" w{t}")
    for ev in evs[:3]:
        view.update(ev)
    assert view.canvas == (1, 6, 8, M)
    assert view.recent == {2: (7, evs[1].elapsed_s)}  # was position 3 before the delete
    plain = view.block_row().plain
    assert plain.index(" w5") < plain.index(" w6") < plain.index(" w7→ w8")
