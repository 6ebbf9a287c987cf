"""Structured output with LLaDA2.2 insert/delete edits on (``dllm_cli.decoding.guided_indel``).

* ``edit_feasibility`` (pick time) equals applying the edit with ``apply_edit_ops`` and checking the shifted canvas.
* ``EditGuide.settle`` on hand-made canvases: an edit that breaks completability is skipped, one that keeps it is
  applied, two edits feasible alone but not together keep the more confident one, and a token that a delete pulls
  into the answer is re-checked there.
* Random-logits 2.2 models (garbage unconstrained, see ``structured_vocab``) with DELETE/SPLIT pushed up: every answer
  validates, edits really happen (and some are refused), and without the re-check after each shift answers break.
* A constraint that allows everything changes no token, step or edit of a 2.2 decode with indel on.
* Multi-block editing (2.1) and 2.2 sampling (editing off) keep the guarantee.
* On the patched runtime, a random-weight 2.2 GGUF inserts and deletes inside answers that validate.
"""
from __future__ import annotations

import itertools
import json
import re
import sys
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from runtime_marks import needs_runtime  # noqa: E402
from structured_vocab import DELETE, EOS, EOT, MASK, SPLIT, V, answer, random_model, vocab  # noqa: E402
from test_structured import REGEXES, SCHEMAS, constraint  # noqa: E402

from dllm_cli.decoding import ScriptedModel, StepEvent, collect, generate, make_config  # noqa: E402
from dllm_cli.decoding.automaton import compile_regex, vocab_from_pieces  # noqa: E402
from dllm_cli.decoding.guided import Constraint, Guide  # noqa: E402
from dllm_cli.decoding.guided_indel import EditGuide, edit_feasibility  # noqa: E402
from dllm_cli.decoding.levenshtein import apply_edit_ops  # noqa: E402
from dllm_cli.decoding.sampling import make_sampler  # noqa: E402
from dllm_cli.decoding.stepper import top2_from_logits  # noqa: E402

# A small vocabulary for hand-made canvases: digits, letters, braces; then END, DELETE, SPLIT, MASK.
SMALL: list[bytes | None] = [b"0", b"1", b"2", b"3", b"a", b"b", b"{", b"}", None, None, None, None]
S_END, S_DEL, S_SPL, S_M = 8, 9, 10, 11
S_ID = {ch: i for i, ch in enumerate(["0", "1", "2", "3", "a", "b", "{", "}"])}
EDIT_BIAS = {DELETE: 3.0, SPLIT: 3.0}  # random logits with edits in the lead often: the mode is exercised


def small_guide(regex: str, *, P: int = 0, max_tokens: int = 8) -> EditGuide:
    c = Constraint("regex", regex, compile_regex(regex, vocab_from_pieces(SMALL, (S_END,))))
    g = Guide(c, mask_id=S_M, P=P, max_tokens=max_tokens, sampler=make_sampler(), rng=np.random.default_rng(0))
    return EditGuide(g, delete_id=S_DEL, split_id=S_SPL, indel=True)


def ids(text: str) -> list[int]:
    return [S_ID[ch] for ch in text]


def settle(eg: EditGuide, block: list[int], written: list[int], p: list[float],
           logits: np.ndarray | None = None) -> list[int]:
    """Settle ``written`` over the canvas ``block`` (one block at position 0, no prompt); the rows' step output
    prefers token '0' unless ``logits`` [B, V] are given. Returns the block after the accepted writes' shifts."""
    B = len(block)
    lg = np.full((B, len(SMALL)), -5.0) if logits is None else logits
    if logits is None:
        lg[:, 0] = 5.0
    out = top2_from_logits(lg, S_M, want_logits=True)
    canvas, rows, prompt = np.array(block), np.arange(B), np.zeros(B, dtype=bool)
    acc = eg.settle(canvas, 0, B, np.array(written), np.array(p, dtype=float), out, rows, prompt)
    return apply_edit_ops(acc, canvas, prompt, prompt, mask_id=S_M, delete_id=S_DEL, split_id=S_SPL).block.tolist()


# --- pick time: the closed form equals applying the edit -------------------------------------------------------

def test_edit_feasibility_equals_applying_the_edit() -> None:
    rng = np.random.default_rng(7)
    for regex in [r"\{[ab]*\}", r"[0-3]{2,4}", r"(a|b1)*2?", r"\{[0-3]{3}\}|ab"]:
        eg = small_guide(regex)
        ch = eg.checker
        for _ in range(400):
            B = int(rng.integers(2, 8))
            block = rng.choice(list(range(8)) + [S_END, S_M, S_M, S_M], size=B)
            lo = int(rng.integers(0, B))
            hi = int(rng.integers(lo + 1, B + 1))
            start = ch.start(ch.a.initial)
            if not ch.feasible(start, block[lo:hi]):
                continue
            prompt = np.arange(B) < lo
            got_d, got_s = edit_feasibility(ch, start, block, lo, hi)
            for j in range(lo, hi):
                for edit, got in ((S_DEL, got_d), (S_SPL, got_s)):
                    written = block.copy()
                    written[j] = edit
                    shifted = apply_edit_ops(written, block, prompt, prompt, mask_id=S_M, delete_id=S_DEL,
                                             split_id=S_SPL).block
                    assert got[j - lo] == ch.feasible(start, shifted[lo:hi]), (regex, block, lo, hi, j, edit)


# --- settle: the re-check after each shift ---------------------------------------------------------------------

def test_deleting_a_closing_brace_that_cannot_be_refilled_is_refused() -> None:
    eg = small_guide(r"\{[ab]*\}")
    block = ids("{ab}") + [S_END] * 4
    got = settle(eg, block, ids("{ab") + [S_DEL] + [S_END] * 4, [0.1] * 3 + [0.9] + [0.1] * 4)
    assert got == block and eg.rejected == 1 and eg.accepted == 0  # '{ab' then END: never valid


def test_deleting_a_letter_before_the_brace_is_applied() -> None:
    eg = small_guide(r"\{[ab]*\}")
    block = ids("{ab}") + [S_END] * 4
    got = settle(eg, block, ids("{a") + [S_DEL] + ids("}") + [S_END] * 4, [0.1, 0.1, 0.9] + [0.1] * 5)
    assert got == ids("{a}") + [S_END] * 4 + [S_M] and eg.accepted == 1 and eg.rejected == 0


def test_an_insert_that_needs_a_fourth_digit_is_refused_and_one_that_fits_is_applied() -> None:
    block = ids("123") + [S_END] * 5
    written = ids("1") + [S_SPL] + ids("3") + [S_END] * 5
    eg = small_guide(r"[0-3]{3}")  # the new slot would make four digits
    assert settle(eg, block, written, [0.1, 0.9] + [0.1] * 6) == block and eg.rejected == 1
    eg = small_guide(r"[0-3]{3,4}")
    assert settle(eg, block, written, [0.1, 0.9] + [0.1] * 6) == ids("1") + [S_M] + ids("23") + [S_END] * 4
    assert eg.accepted == 1


@pytest.mark.parametrize("first", [0, 1])
def test_two_deletes_feasible_alone_but_not_together_keep_the_more_confident(first: int) -> None:
    eg = small_guide(r"a{2,3}")
    block = ids("aaa") + [S_END] * 3
    written = [S_DEL, S_DEL] + ids("a") + [S_END] * 3
    p = [0.9, 0.5] if first == 0 else [0.5, 0.9]
    got = settle(eg, block, written, p + [0.1] * 4)
    assert got == ids("aa") + [S_END] * 3 + [S_M]
    assert eg.accepted == 1 and eg.rejected == 1  # either alone leaves 'aa'; both would leave 'a'


def test_a_token_a_delete_pulls_into_the_answer_is_rechecked_there() -> None:
    """max_tokens 3 ends the answer inside the block: cell 3 is outside it and written freely (END), until the
    delete at cell 0 pulls it in; '23' then END is not a 3-digit answer, so it is re-picked from its row."""
    eg = small_guide(r"[0-3]{3}", max_tokens=3)
    block = ids("1230") + [S_M] * 4
    lg = np.full((8, len(SMALL)), -5.0)
    lg[:, S_END], lg[:, 1] = 5.0, 3.0  # every row prefers END, then '1'
    got = settle(eg, block, [S_DEL] + ids("23") + [S_END] + [S_M] * 4, [0.9, 0.1, 0.1, 0.5] + [0.1] * 4, lg)
    assert got[:3] == ids("231") and eg.guide.rechecks == 1
    assert eg.checker.feasible(eg.checker.start(eg.checker.a.initial), np.array(got[:3]))


def test_a_token_an_insert_moves_is_checked_at_its_new_place() -> None:
    """'{a}' + END: the insert (more confident) opens a slot before 'a' and moves the brace one right; the END
    written over the brace's old cell lands there, after '{' + slot + 'a', where only '}' fits: re-picked."""
    eg = small_guide(r"\{[ab]*\}")
    block = ids("{a}") + [S_END] * 3
    lg = np.full((6, len(SMALL)), -5.0)
    lg[:, S_END], lg[:, S_ID["}"]] = 5.0, 3.0
    got = settle(eg, block, ids("{") + [S_SPL] + [S_END] * 4, [0.1, 0.9, 0.5, 0.1, 0.1, 0.1], lg)
    assert got == ids("{") + [S_M] + ids("a}") + [S_END] * 2 and eg.guide.rechecks == 1


# --- end to end on random-logits 2.2 models ------------------------------------------------------------------

def decode22(c: Constraint | None, mode: str, seed: int, prompt: list[int], max_tokens: int = 120,
             bias: dict[int, float] | None = EDIT_BIAS) -> Any:
    model = random_model(seed, v22=True, bias=bias)
    cfg = make_config(mode, "2.2", max_tokens=max_tokens, seed=seed, stop_ids=(EOT,), indel=True)
    return collect(generate(model, prompt, cfg, constraint=c))


def valid(kind: str, name: str, done: Any) -> bool:
    text = answer(done.ids)
    if done.finish_reason != "eos":
        return False
    if kind == "regex":
        return re.fullmatch(REGEXES[name], text) is not None
    try:
        jsonschema.validate(json.loads(text), SCHEMAS[name])
        return True
    except (ValueError, jsonschema.ValidationError):
        return False


CASES = [("schema", n) for n in sorted(SCHEMAS)] + [("regex", n) for n in sorted(REGEXES) if n != "unicode_digits"]
PROMPTS = [[1, 2, 3], [4] * 8, [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15], [20, 21]]


@pytest.fixture
def edit_counts(monkeypatch: Any) -> dict[str, int]:
    """Edits kept and refused by ``EditGuide.settle`` during the test (both count only edits that move answer cells)."""
    counts = {"accepted": 0, "rejected": 0}
    real = EditGuide.settle

    def counted(self: EditGuide, *a: Any, **k: Any) -> np.ndarray:
        before = (self.accepted, self.rejected)
        out = real(self, *a, **k)
        counts["accepted"] += self.accepted - before[0]
        counts["rejected"] += self.rejected - before[1]
        return out

    monkeypatch.setattr(EditGuide, "settle", counted)
    return counts


@pytest.mark.parametrize("mode", ["speed", "quality"])
@pytest.mark.parametrize("kind,name", CASES, ids=[f"{k}-{n}" for k, n in CASES])
def test_answers_validate_with_insert_and_delete_on(edit_counts: dict[str, int], mode: str, kind: str,
                                                    name: str) -> None:
    c = constraint(kind, name)
    edits = 0
    for seed in range(8):
        done = decode22(c, mode, seed, PROMPTS[seed % len(PROMPTS)])
        assert valid(kind, name, done), (seed, answer(done.ids))
        edits += done.inserts + done.deletes
    assert edits > 0 and edit_counts["accepted"] > 0  # insert/delete really ran inside the constrained answers


def test_some_edits_are_refused_by_the_recheck(edit_counts: dict[str, int]) -> None:
    """Across a few decodes the re-check after a shift refuses edits: the pick-time check (each edit alone, on the
    pre-step block) is not enough, because the writes of one step interact."""
    for (kind, name), seed in itertools.product(CASES[:4], range(3)):
        decode22(constraint(kind, name), "speed", seed, PROMPTS[seed % len(PROMPTS)])
    assert edit_counts["rejected"] > 0 and edit_counts["accepted"] > edit_counts["rejected"]


def test_without_the_recheck_answers_break(monkeypatch: Any) -> None:
    """The control: accepting every write of a step as written (edits checked only alone, at pick time) gives
    invalid answers or canvases that cannot be completed, so the tests above depend on the re-check."""
    monkeypatch.setattr(EditGuide, "settle", lambda self, canvas, s0, we, written, *a, **k: written)
    broken = 0
    for (kind, name), seed in itertools.product(CASES, range(3)):
        try:
            broken += not valid(kind, name, decode22(constraint(kind, name), "speed", seed, PROMPTS[seed % 4]))
        except ValueError:  # an empty allowed set: the canvas was left infeasible
            broken += 1
    assert broken > 0


def test_no_edits_are_offered_with_indel_off() -> None:
    c = constraint("regex", "date")
    for seed in range(4):
        model = random_model(seed, v22=True, bias=EDIT_BIAS)
        cfg = make_config("speed", "2.2", max_tokens=60, seed=seed, stop_ids=(EOT,), indel=False)
        done = collect(generate(model, PROMPTS[seed % 4], cfg, constraint=c))
        assert done.inserts == done.deletes == 0 and re.fullmatch(REGEXES["date"], answer(done.ids))


# --- a constraint that allows everything changes nothing -------------------------------------------------------

def deterministic_model(seed: int, bias: dict[int, float]) -> ScriptedModel:
    """Random logits that are a function of the step's input (a re-run of the same step gives the same logits)."""
    def script(n: int, tokens: list[int], start: int) -> np.ndarray:
        lg = np.random.default_rng([seed, start, *tokens]).standard_normal((len(tokens), V)).astype(np.float32) * 3
        for t, b in bias.items():
            lg[:, t] += b
        return lg

    return ScriptedModel(script, n_vocab=V, mask_id=MASK, eos_id=EOS, block_length=8, n_ctx=4096,
                         edit_ids=(DELETE, SPLIT))


def test_a_constraint_allowing_everything_changes_no_token_or_edit() -> None:
    """Under '(?s:.*)' with indel on: same ids, steps, substitutions, inserts and deletes as unconstrained.
    Non-ASCII bytes and the end ids are pushed far down, so every unconstrained answer is ASCII text that the
    constraint allows (it admits valid UTF-8 only)."""
    c = Constraint("regex", "any", compile_regex(r"(?s:.*)", vocab()))
    ascii_only = {t: -30.0 for t, piece in enumerate(vocab().pieces) if piece is None or max(piece) >= 0x80}
    ascii_only.pop(DELETE), ascii_only.pop(SPLIT), ascii_only.pop(MASK)
    edits = 0
    for mode, extra, seed in itertools.product(["speed", "quality"], [{}, EDIT_BIAS], range(3)):
        bias = {**ascii_only, **extra, EOS: -30.0, EOT: -30.0}
        cfg = make_config(mode, "2.2", max_tokens=40, seed=seed, stop_ids=(EOT,), indel=True)
        prompt = PROMPTS[seed % 4]
        free = collect(generate(deterministic_model(seed, bias), prompt, cfg))
        held = collect(generate(deterministic_model(seed, bias), prompt, cfg, constraint=c))
        assert (held.ids, held.steps, held.edits, held.inserts, held.deletes) == \
            (free.ids, free.steps, free.edits, free.inserts, free.deletes), (mode, extra, seed)
        assert held.forwards <= free.forwards  # fewer where a final round's scrub needed logits the step had
        edits += free.inserts + free.deletes
    assert edits > 0


def test_edits_are_never_offered_when_sampling() -> None:
    """Greedy only (LLaDA2.2 edits decode greedily): a sampling guide offers no DELETE/SPLIT."""
    eg = small_guide(r"[0-3]*")
    eg.guide.sampler = make_sampler(temperature=1.0)
    lg = np.full((4, len(SMALL)), -5.0)
    lg[:, S_DEL] = 9.0
    out = top2_from_logits(lg, S_M, want_logits=True)
    block = np.array(ids("12") + [S_M, S_M])
    rows = np.arange(4)
    pred = eg.predict(block, 0, 4, rows, out, block.copy(), np.zeros(4), block.copy(), lambda bad: block.copy())
    assert not np.isin(pred.x0, [S_DEL, S_SPL]).any()


# --- the other modes whose written positions move or spread: multi-block editing, sampling ---------------------

def test_multi_block_editing_revises_earlier_blocks_and_validates() -> None:
    """Multi-block editing (LLaDA2.1; 2.2 files refuse --mbe) under a constraint: substitutions land in finished
    blocks still in the window, re-checked against the whole window, and every answer validates."""
    earlier = 0
    for (kind, name), seed in itertools.product([("schema", "nested"), ("regex", "idents")], range(3)):
        cfg = make_config("speed", "2.1", max_tokens=160, seed=seed, stop_ids=(EOT,), mbe=2)
        events = list(generate(random_model(seed), PROMPTS[seed % 4], cfg, constraint=constraint(kind, name)))
        steps = [ev for ev in events if isinstance(ev, StepEvent)]
        earlier += sum(ev.start + i < ev.block * 8 for ev in steps for i, _, _ in ev.edited)
        assert valid(kind, name, events[-1]), answer(events[-1].ids)
    assert earlier > 0


@pytest.mark.parametrize("kind,name", [("schema", "nested"), ("schema", "optional"), ("regex", "phone")])
def test_22_sampling_validates(kind: str, name: str) -> None:
    """LLaDA2.2 samples only with editing off (its edits decode greedily: ``make_config`` refuses temperature > 0
    with editing); that mode keeps the guarantee too."""
    for seed in range(4):
        model = random_model(seed, v22=True, bias=EDIT_BIAS)
        cfg = make_config("speed", "2.2", max_tokens=120, seed=seed, stop_ids=(EOT,), editing=False,
                          temperature=1.0, top_k=30)
        done = collect(generate(model, PROMPTS[seed % 4], cfg, constraint=constraint(kind, name)))
        assert valid(kind, name, done) and done.inserts == done.deletes == 0, answer(done.ids)


# --- the real runtime: a random-weight LLaDA2.2 GGUF ---------------------------------------------------------------

@needs_runtime
def test_22_gguf_inserts_and_deletes_inside_valid_answers(tmp_path: Path) -> None:
    """A tiny random-weight 2.2 file (DELETE/SPLIT head rows scaled up) on the patched runtime, both presets
    (insert/delete on): every constrained answer validates and the decoder did insert and delete inside them."""
    from converters import convert
    from test_llada22 import write_llada22
    from test_structured_demo import SCHEMA

    from dllm_cli import constrain
    from dllm_cli.generate import decode_config, load
    from dllm_cli.generate import generate as run
    from dllm_cli.runtime.options import RuntimeOptions

    write_llada22(tmp_path / "ckpt", edit_boost=3.0)
    loaded = load(str(convert(tmp_path / "ckpt", tmp_path / "t22.gguf", outtype="f32").path),
                  RuntimeOptions(ctx_size=512))
    try:
        schema = constrain.build(loaded.model, constrain.request(schema=SCHEMA))
        date = constrain.build(loaded.model, constrain.request(regex_arg=r"[0-9]{4}-[0-9]{2}-[0-9]{2}"))
        edits = 0
        for i, mode in itertools.product(range(2), ["quality", "speed"]):
            ids = loaded.model.tokenize(f"prompt {i} for 2.2", special=False)
            cfg = decode_config(loaded.model, mode, max_tokens=96)
            assert cfg.indel
            done = run(loaded, ids, cfg, schema)
            jsonschema.validate(json.loads(done.text), SCHEMA)
            edits += done.inserts + done.deletes
            done = run(loaded, ids, cfg, date)
            assert re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", done.text), done.text
            edits += done.inserts + done.deletes
        assert edits > 0
    finally:
        loaded.close()
