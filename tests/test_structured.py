"""Structured output: every decoding mode keeps a random-logits model inside a JSON Schema / regex / tool-call format.

The scripted model writes Gaussian-noise logits (``tests/structured_vocab.py``): unconstrained it never writes valid
JSON, so every passing case here is the constraint's doing. Each case runs over several seeds and prompts; the
answers must validate 100 % with ``jsonschema`` / ``re.fullmatch`` and end with an end id (``finish_reason`` eos).
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
from structured_vocab import EOS, EOT, MASK, V, answer, random_model, vocab  # noqa: E402

from dllm_cli.constrain import tool_calls, without  # noqa: E402
from dllm_cli.decoding import collect, generate, make_config  # noqa: E402
from dllm_cli.decoding.automaton import compile_regex  # noqa: E402
from dllm_cli.decoding.guided import Constraint  # noqa: E402
from dllm_cli.decoding.schema import schema_regex  # noqa: E402

SCHEMAS: dict[str, Any] = {
    "flat": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 5}, "ok": {"type": "boolean"}},
             "required": ["name", "ok"]},
    "nested": {"type": "object", "properties": {
        "user": {"type": "object", "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 99},
                                                  "roles": {"type": "array", "items": {"enum": ["a", "b"]},
                                                            "maxItems": 2}},
                 "required": ["id", "roles"]},
        "pts": {"type": "array", "items": {"type": "array", "items": {"type": "integer", "minimum": -3,
                                                                      "maximum": 3}, "maxItems": 2},
                "minItems": 1, "maxItems": 2}},
        "required": ["user", "pts"]},
    "enum_unicode": {"type": "object", "properties": {"city": {"enum": ["Zürich", "été", "€5", "plain"]}},
                     "required": ["city"]},
    "bounded": {"type": "object", "properties": {"n": {"type": "integer", "minimum": 10, "maximum": 20},
                                                 "m": {"type": "integer", "exclusiveMinimum": -2, "maximum": 2}},
                "required": ["n", "m"]},
    "pattern": {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"}},
                "required": ["code"]},
    "optional": {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9},
                                                  "b": {"type": "string", "maxLength": 3},
                                                  "c": {"type": "null"}},
                 "required": ["a"]},
}
REGEXES = {"date": r"[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])",
           "phone": r"\+?1? ?\([0-9]{3}\) [0-9]{3}-[0-9]{4}",
           "unicode_digits": r"\d\d-\d",  # Unicode digits (outlines-core's Rust regex), checked with re below
           "idents": r"[a-z_][a-z0-9_]{0,5}(, [a-z_][a-z0-9_]{0,5}){0,3}"}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
             "type": "object", "properties": {"city": {"type": "string", "maxLength": 6},
                                              "unit": {"enum": ["c", "f"]}}, "required": ["city", "unit"]}}},
         {"type": "function", "function": {"name": "add", "parameters": {
             "type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 50},
                                              "b": {"type": "integer", "minimum": 0, "maximum": 50}},
             "required": ["a", "b"]}}}]
# (version, mode, overrides): LLaDA2.0 threshold schedule, 2.1 M2T+T2T (speed edits every differing argmax),
# 2.1 without editing, multi-block editing, sampling, 2.2 Levenshtein (with and without DELETE/INSERT)
MODES = [("2.0", "quality", {"editing": False}), ("2.1", "speed", {}), ("2.1", "quality", {}),
         ("2.1", "speed", {"editing": False}), ("2.1", "speed", {"mbe": 2}),
         ("2.1", "speed", {"temperature": 1.0, "top_k": 20}), ("2.1", "quality", {"temperature": 0.7, "top_p": 0.9}),
         ("2.2", "speed", {}), ("2.2", "quality", {"indel": True})]
PROMPTS = [[1, 2, 3], [4] * 8, [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]]  # block tails of 3, 0 and 3 tokens (B 8)
_CACHE: dict[str, Constraint] = {}


def constraint(kind: str, key: str) -> Constraint:
    if key not in _CACHE:
        regex = {"schema": lambda: schema_regex(SCHEMAS[key]), "regex": lambda: REGEXES[key]}[kind]()
        _CACHE[key] = Constraint(kind, key, compile_regex(regex, vocab()))
    return _CACHE[key]


def decode(c: Constraint | None, version: str, mode: str, kw: dict[str, Any], seed: int, prompt: list[int],
           max_tokens: int = 160) -> Any:
    model = random_model(seed, v22=version == "2.2")
    cfg = make_config(mode, version, max_tokens=max_tokens, seed=seed, stop_ids=(EOT,), **kw)
    return collect(generate(model, prompt, cfg, constraint=c))


def seeds(n: int = 4) -> list[tuple[int, list[int]]]:
    return [(s, PROMPTS[s % len(PROMPTS)]) for s in range(n)]


@pytest.mark.parametrize("version,mode,kw", MODES, ids=[f"{v}-{m}-{'-'.join(k) or 'default'}" for v, m, k in MODES])
@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_every_mode_validates_schemas(version: str, mode: str, kw: dict[str, Any], name: str) -> None:
    c = constraint("schema", name)
    for seed, prompt in seeds():
        done = decode(c, version, mode, kw, seed, prompt)
        text = answer(done.ids)
        assert done.finish_reason == "eos", (seed, text)
        jsonschema.validate(json.loads(text), SCHEMAS[name])


@pytest.mark.parametrize("version,mode,kw", MODES, ids=[f"{v}-{m}-{'-'.join(k) or 'default'}" for v, m, k in MODES])
@pytest.mark.parametrize("name", sorted(REGEXES))
def test_every_mode_matches_regexes(version: str, mode: str, kw: dict[str, Any], name: str) -> None:
    c = constraint("regex", name)
    for seed, prompt in seeds():
        done = decode(c, version, mode, kw, seed, prompt)
        assert done.finish_reason == "eos"
        text = answer(done.ids)
        if name == "unicode_digits":  # Rust's Unicode tables may be newer than Python's: check the shape only
            assert len(text) == 4 and text[2] == "-" and all(ch.isdigit() or ord(ch) > 0x1E000 for ch in text[:2]), text
        else:
            assert re.fullmatch(REGEXES[name], text), text


@pytest.mark.parametrize("version,mode,kw", MODES[:2] + MODES[5:6] + MODES[7:8])
@pytest.mark.parametrize("choice", ["required", "add", "auto"])
def test_tool_calls_parse_and_validate(version: str, mode: str, kw: dict[str, Any], choice: str) -> None:
    from dllm_cli.serve.tools import parse_tool_calls

    c = tool_calls(vocab(), TOOLS, choice)
    params = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    for seed, prompt in seeds(3):
        done = decode(c, version, mode, kw, seed, prompt, max_tokens=600)
        text = answer(done.ids)
        parsed = parse_tool_calls(text)
        if choice == "auto" and parsed is None:
            assert "<tool_call>" not in text  # plain text (unbounded: it may end at max_tokens)
            continue
        assert parsed is not None and done.finish_reason == "eos", text
        for call in parsed[1]:
            name = call["function"]["name"]
            assert name in params and (choice in ("required", "auto") or name == choice)
            jsonschema.validate(json.loads(call["function"]["arguments"]), params[name])


def test_unconstrained_random_model_writes_garbage() -> None:
    """The control: the same decodes without a constraint never validate (so the tests above cannot pass by luck)."""
    valid = 0
    for (version, mode, kw), (seed, prompt) in itertools.product(MODES, seeds(3)):
        text = answer(decode(None, version, mode, kw, seed, prompt, max_tokens=40).ids)
        valid += bool(re.fullmatch(REGEXES["date"], text))
        try:
            jsonschema.validate(json.loads(text), SCHEMAS["optional"])
            valid += 1
        except (ValueError, jsonschema.ValidationError):
            pass
    assert valid == 0


def test_length_ending_keeps_the_text_so_far() -> None:
    """A structure that needs more than max_tokens ends with finish_reason length and a prefix of a valid answer."""
    c = constraint("regex", "phone")
    full = compile_regex(REGEXES["phone"], vocab())
    for seed, prompt in seeds(3):
        done = decode(c, "2.1", "speed", {}, seed, prompt, max_tokens=6)
        assert done.finish_reason == "length" and len(done.ids) == 6
        assert EOS not in done.ids
        from dllm_cli.decoding.constraint import Checker
        ch = Checker(full, MASK)
        assert ch.prefix_state(np.array(done.ids)) >= 0 and ch.live[ch.prefix_state(np.array(done.ids))]


def test_empty_regex_ends_at_once() -> None:
    c = Constraint("regex", "", compile_regex("", vocab()))
    for version, mode, kw in MODES:
        done = decode(c, version, mode, kw, 3, [1, 2, 3])
        assert answer(done.ids) == "" and done.finish_reason == "eos" and done.ids[0] in (EOS, EOT)


def test_without_word_is_exact() -> None:
    """``without`` is the language of strings not containing the word (tool_choice auto's plain text)."""
    r = re.compile(without("<tool_call>"))
    rng = np.random.default_rng(0)
    parts = ["<", "t", "o", "l", "_", "c", "a", ">", "x", "\n", "<tool_call", "<too", "é", "<tool_call>"]
    for _ in range(5000):
        s = "".join(parts[i] for i in rng.integers(0, len(parts), rng.integers(0, 10)))
        assert (r.fullmatch(s) is not None) == ("<tool_call>" not in s), s


def test_vocab_sanity() -> None:
    assert V == MASK + 1 and EOS < EOT < MASK


def test_checker_matches_brute_force() -> None:
    """Allowed sets equal an enumeration of every filling of the masks and every short future (the oracle)."""
    from dllm_cli.decoding.automaton import vocab_from_pieces
    from dllm_cli.decoding.constraint import Checker

    pieces: list[bytes | None] = [b"a", b"b", b"ab", b"ba", b"c", None, None]  # 5: END, 6: MASK
    END, M, toks = 5, 6, range(6)
    for pattern in [r"(ab|c)*a?", r"a(bc)?b*", r"c{2,3}|ab"]:
        ch = Checker(compile_regex(pattern, vocab_from_pieces(pieces, (END,))), M)
        rx = re.compile(pattern)

        def ok(seq: tuple[int, ...]) -> bool:
            text, ended = "", False
            for t in seq:
                if t == END:
                    ended = True
                elif ended:
                    return False
                else:
                    text += (pieces[t] or b"").decode()
            if ended:
                return rx.fullmatch(text) is not None
            futures = itertools.chain.from_iterable(itertools.product(range(5), repeat=k) for k in range(4))
            return any(rx.fullmatch(text + "".join((pieces[f] or b"").decode() for f in fut)) for fut in futures)

        rng = np.random.default_rng(1)
        for _ in range(60):
            cells = rng.choice([0, 1, 2, 3, 4, END, M, M, M], size=rng.integers(1, 5))
            masks = [i for i, t in enumerate(cells) if t == M]
            fills = list(itertools.product(toks, repeat=len(masks)))
            def filled(f: tuple[int, ...]) -> tuple[int, ...]:
                c = cells.copy()
                c[masks] = f
                return tuple(int(x) for x in c)

            good = [f for f in fills if ok(filled(f))]
            assert ch.feasible(ch.start(ch.a.initial), cells) == bool(good), (pattern, cells)
            if not good:
                continue
            allowed = ch.allowed_rows(ch.start(ch.a.initial), cells, np.array(masks))
            for j, i in enumerate(masks):
                want = {f[j] for f in good}
                assert set(np.flatnonzero(allowed[j][:6]).tolist()) == want, (pattern, cells, i)


def test_confidence_is_renormalised_over_the_allowed_set() -> None:
    """The fast greedy pick (top-2 shortcut, complement sums) equals argmax and softmax over the allowed set."""
    from dllm_cli.decoding.pick import ClassIndex, greedy
    from dllm_cli.decoding.stepper import top2_from_logits

    rng = np.random.default_rng(3)
    n_vocab, n_cls, mask = 3000, 12, 2999
    token_class = rng.integers(0, n_cls - 1, n_vocab).astype(np.int32)
    token_class[mask] = n_cls - 1  # the mask's class (NONE) is never allowed
    index = ClassIndex(token_class, n_cls)
    for trial in range(200):
        logits = (rng.standard_normal(n_vocab) * rng.choice([0.5, 3.0, 12.0])).astype(np.float32)  # [V]
        allowed = rng.random(n_cls) < rng.choice([0.1, 0.5, 0.95])  # [C]
        allowed[n_cls - 1] = False
        if not allowed.any():
            allowed[trial % (n_cls - 1)] = True
        head = top2_from_logits(logits[None, :], mask)
        got, p = greedy(logits, allowed, index, head.ids[0], head.probs[0], mask)
        ok = allowed[token_class]  # [V]
        lg = np.where(ok, logits.astype(np.float64), -np.inf)
        want = int(np.argmax(lg))
        e = np.exp(lg - lg[want])
        assert got == want and p == pytest.approx(1.0 / e.sum(), rel=1e-4), trial


@pytest.mark.parametrize("first", [0, 1])
def test_conflicting_picks_are_committed_in_confidence_order(first: int) -> None:
    """Each pick is allowed alone ('a' fits both cells of ab|ba) but not together: the more confident one is
    written, the other re-picked against the updated canvas; without the re-check the block would read 'aa'."""
    from dllm_cli.decoding.automaton import vocab_from_pieces
    from dllm_cli.decoding.guided import Guide
    from dllm_cli.decoding.sampling import make_sampler
    from dllm_cli.decoding.stepper import top2_from_logits

    pieces: list[bytes | None] = [b"a", b"b", None, None]  # 2: END, 3: MASK
    c = Constraint("regex", "ab|ba", compile_regex("ab|ba", vocab_from_pieces(pieces, (2,))))
    g = Guide(c, mask_id=3, P=0, max_tokens=2, sampler=make_sampler(), rng=np.random.default_rng(0))
    canvas = np.array([3, 3])
    logits = np.array([[2.0, 0.0, -5.0, -9.0], [2.0, 0.0, -5.0, -9.0]])  # both rows prefer 'a'
    out = top2_from_logits(logits, 3, want_logits=True)
    ids, p = g.predict(canvas, 0, 2, np.array([0, 1]), out)
    assert ids.tolist() == [0, 0]  # 'a' is allowed at each cell alone
    p = np.array([0.9, 0.5]) if first == 0 else np.array([0.5, 0.9])
    new = g.settle(canvas, 0, 2, np.array([0, 0]), p, out, np.array([0, 1]))
    assert new.tolist() == ([0, 1] if first == 0 else [1, 0]) and g.rechecks == 1
