"""The demo model's synthetic tasks, split, chat rendering, BPE encoder and evaluation decoder (no torch)."""
from __future__ import annotations

import random
import re

import numpy as np
import pytest

from dllm_cli.demo import tasks
from dllm_cli.demo.bpe import BPE, pretokenize
from dllm_cli.demo.evaluate import decode
from dllm_cli.demo.tokenizer import SPECIAL_TOKENS, train_bpe

# The bailingmoe2 split regex with \p{L} / \p{N} spelled out for ASCII input (Python's re has no \p).
ASCII_SPLIT = re.compile(r"'(?:[sSdDmMtT]|[lL][lL]|[vV][eE]|[rR][eE])|[^\r\nA-Za-z0-9]?[A-Za-z]+|[0-9]"
                         r"| ?[^\sA-Za-z0-9]+[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+")


@pytest.fixture(scope="module")
def bpe() -> BPE:
    return BPE(train_bpe(tasks.tokenizer_corpus(0, 400), 120))


def test_generator_is_deterministic_for_a_seed():
    assert tasks.examples(7, 50, heldout=False) == tasks.examples(7, 50, heldout=False)
    assert tasks.examples(7, 50, heldout=False) != tasks.examples(8, 50, heldout=False)
    assert tasks.eval_set(40) == tasks.eval_set(40)


def _expected(ex: tasks.Example) -> str:
    """An independent solver for every task, from the user message alone."""
    u = ex.user
    if ex.task in ("add", "sub"):
        a, b = map(int, re.findall(r"\d+", u))
        return str(a + b if ex.task == "add" else a - b)
    if ex.task == "copy":
        return u.split(": ", 1)[1]
    if ex.task in ("reverse", "reverse_long"):
        return " ".join(u.split(": ", 1)[1].split()[::-1])
    if ex.task in ("sort", "sort_long"):
        return " ".join(sorted(u.split(": ", 1)[1].split(), key=int))
    if ex.task == "range":
        a, b = map(int, re.findall(r"\d+", u))
        return " ".join(str(v) for v in range(a, b + 1))
    if ex.task == "spell":
        return " ".join(next(w for w in re.findall(r"[a-z]+", u) if w in tasks.SPELL_WORDS))
    if ex.task == "repeat":
        m = re.fullmatch(r"(?:Say|Write) ([a-z ]+) (\d+) times\.", u)
        return " ".join([m.group(1)] * int(m.group(2)))
    if ex.task == "capitals":
        table = dict(tasks.CAPITALS)
        return ", ".join(table[c] for c in re.findall(r"[A-Z][a-z]+", u.split(" of ", 1)[1]))
    if ex.task == "count":
        word = u.split("does ")[1].split(" appear")[0]
        return str(u.split(": ", 1)[1].rstrip("?").split().count(word))
    table = dict(tasks.CAPITALS if ex.task in ("capital", "country") else tasks.COLOURS)
    return next(v for k, v in table.items() if re.search(rf"\b{k}\b", u))


# The phrasing families' grammars, written out independently of tasks.OPINION / OBJECT / COUNTRY.
PHRASING_RE = {
    "opinion": r"(The|This) {x} is (very|quite) (nice|good)[.!] I (like|want) it[.!]",
    "object": r"(The|This) {x} is {c}[.!] It is (a very|quite a) (nice|good) colour[.!]",
    "country": r"(Well|So), the capital of {x} is {c}[.!] It is (a very|quite a) (nice|great) city[.!]",
    "number": r"(Well|So), {x} is an {c} number[.!] It is (a very|quite a) (nice|good) number[.!]",
}


def _phrasing_ok(ex: tasks.Example, answer: str) -> bool:
    x = re.search(r"(?:the )?([A-Za-z0-9]+)[.?]$", ex.user).group(1)  # type: ignore[union-attr]
    c = ("odd" if int(x) % 2 else "even") if x.isdigit() else dict(tasks.CAPITALS + tasks.COLOURS).get(x, "")
    return re.fullmatch(PHRASING_RE[ex.task].format(x=x, c=c), answer) is not None


def test_every_task_answers_exactly_and_wrong_answers_fail():
    rng = np.random.default_rng(3)
    for name, gen in {**tasks.ALL_TASKS, **tasks.PHRASING_TASKS}.items():
        for _ in range(30):
            ex = gen(rng)
            if name in tasks.PHRASING_TASKS:
                assert ex.answer in ex.accept and len(set(ex.accept)) == len(ex.accept) >= 32
                assert all(_phrasing_ok(ex, a) for a in ex.accept), ex
                assert all(tasks.check(ex, a + "<|role_end|>") for a in ex.accept)
            else:
                assert ex.task == name and ex.answer == _expected(ex) and not ex.accept, ex
            assert tasks.check(ex, ex.answer + "<|role_end|><|endoftext|><|endoftext|>")
            assert tasks.check(ex, " " + ex.answer + " ")
            assert not tasks.check(ex, ex.answer + "0")
            assert not tasks.check(ex, "x" + ex.answer + "<|role_end|>")
            assert not tasks.check(ex, "")


def test_train_and_heldout_splits_are_disjoint():
    held = tasks.eval_set(150)
    assert len({e.user for e in held}) == len(held) and all(tasks.in_eval_split(e) for e in held)
    train = tasks.examples(0, 3000, heldout=False)
    assert not {e.user for e in train} & {e.user for e in held}
    assert {e.task for e in held} == set(tasks.TASKS)
    held_all = tasks.eval_set(300, families=tasks.ALL_TASKS)
    assert {e.task for e in held_all} == set(tasks.ALL_TASKS) and all(tasks.in_eval_split(e) for e in held_all)
    train_all = tasks.examples(0, 3000, heldout=False, families=tasks.ALL_TASKS)
    assert not {e.user for e in train_all} & {e.user for e in held_all}
    weighted = tasks.stream(0, extra_weight=3.0, families=tasks.ALL_TASKS)
    drawn = [next(weighted).task for _ in range(600)]
    assert sum(t in tasks.LONG_TASKS for t in drawn) > 400 and not any(tasks.in_eval_split(next(weighted)) for _ in range(200))
    # every fact keeps training questions: only one template per fact is held out
    spell = tuple((w, None) for w in tasks.SPELL_WORDS)
    words = tuple((w, None) for w in tasks.WORDS)
    for table, forms, art in ((tasks.CAPITALS, tasks.CAPITAL_TEMPLATES, ""), (tasks.COLOURS, tasks.COLOUR_TEMPLATES, "the "),
                              (spell, tasks.SPELL_TEMPLATES, ""), (words, tasks.ABOUT_THE_TEMPLATES, ""),
                              (tasks.COLOURS, tasks.ABOUT_THE_TEMPLATES, ""), (tasks.CAPITALS, tasks.ABOUT_TEMPLATES, "")):
        for name, _ in table:
            held_forms = [f for f in forms if tasks.in_eval_split(tasks.Example("f", f.format(x=art + name), ""))]
            assert len(held_forms) == 1


def test_chat_mixture_split_and_wording_frequencies():
    held = tasks.eval_set(200, families=tasks.CHAT_TASKS)
    assert {e.task for e in held} == set(tasks.CHAT_TASKS) and all(tasks.in_eval_split(e) for e in held)
    train = tasks.examples(0, 3000, heldout=False, families=tasks.CHAT_TASKS)
    assert not {e.user for e in train} & {e.user for e in held}
    # each choice takes its first wording with probability PREFERRED, independently of the others
    opinions = [e for e in train if e.task == "opinion"]
    firsts = np.array([[e.answer.startswith("The"), " very " in e.answer, " like " in e.answer] for e in opinions])
    assert len(opinions) > 150
    assert np.all(np.abs(firsts.mean(0) - tasks.PREFERRED) < 0.08), firsts.mean(0)
    assert abs(np.mean(firsts[:, 0] & firsts[:, 1]) - tasks.PREFERRED ** 2) < 0.08


def test_long_families_have_long_answers_and_the_old_families_are_unchanged(bpe):
    assert set(tasks.ALL_TASKS) == set(tasks.TASKS) | set(tasks.LONG_TASKS) and len(tasks.ALL_TASKS) == 14
    rng = np.random.default_rng(5)
    lengths = {name: [len(bpe.encode(tasks.render_target(gen(rng)))) for _ in range(200)]
               for name, gen in tasks.LONG_TASKS.items()}
    assert np.mean([v for vs in lengths.values() for v in vs]) >= 12
    assert max(max(v) for v in lengths.values()) > 32  # some answers spill into a second block
    # the original eight generators still draw the same questions for a seed (pinned held-out answers stay valid)
    rng = np.random.default_rng(0)
    got = [gen(rng) for gen in tasks.TASKS.values()]
    assert [(e.user, e.answer) for e in got[:3]] == [
        ("What is 85 plus 63?", "148"), ("What is 30 - 26?", "4"), ("Copy this: cat tree", "cat tree")]


def test_chat_rendering_matches_the_template():
    ex = tasks.Example("add", "What is 2 + 3?", "5")
    assert tasks.render_prompt(ex) == ("<role>SYSTEM</role>detailed thinking off<|role_end|>"
                                       "<role>HUMAN</role>What is 2 + 3?<|role_end|><role>ASSISTANT</role>")
    sys_ex = tasks.Example("add", "Hi", "5", system="Be brief.")
    assert tasks.render_prompt(sys_ex) == ("<role>SYSTEM</role>Be brief.\ndetailed thinking off<|role_end|>"
                                           "<role>HUMAN</role>Hi<|role_end|><role>ASSISTANT</role>")
    assert tasks.render_target(ex) == "5<|role_end|>"
    assert [tasks.pad_to_block(n) for n in (1, 31, 32, 33, 63)] == [32, 32, 64, 64, 64]


@pytest.mark.parametrize("text,pieces", [
    ("What is 12 + 7?", ["What", " is", " ", "1", "2", " +", " ", "7", "?"]),
    ("I'll go", ["I", "'ll", " go"]),
    ("a  b", ["a", " ", " b"]),
    ("x\n\ny", ["x", "\n\n", "y"]),
    ("end  ", ["end", "  "]),
    ("(abc) 3.14", ["(abc", ")", " ", "3", ".", "1", "4"]),
    ("héllo wörld", ["héllo", " wörld"]),
])
def test_pretokenize_known_splits(text, pieces):
    assert pretokenize(text) == pieces


def test_pretokenize_matches_the_regex_on_random_ascii():
    rng = random.Random(0)
    alphabet = "abcXYZ019 '\n\r\t.,:?!-(sltvdmre"
    for _ in range(2000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 24)))
        assert pretokenize(text) == ASCII_SPLIT.findall(text), repr(text)


def test_bpe_round_trips_and_keeps_special_tokens_whole(bpe):
    for ex in tasks.examples(1, 50, heldout=False) + tasks.eval_set(30):
        text = tasks.render_prompt(ex) + tasks.render_target(ex)
        ids = bpe.encode(text)
        assert bpe.decode(ids) == text
        assert sum(i >= 256 + len(bpe.merges) for i in ids) == sum(text.count(t) for t in SPECIAL_TOKENS)
    for text in ("", "héllo ✓ 日本\n\t x", "<|mask|><|mask|>a<role>", "<|role_end"):
        assert bpe.decode(bpe.encode(text)) == text
    assert bpe.encode("<|mask|>") == [bpe.token_id("<|mask|>")]
    assert bpe.decode(bpe.encode("5<|role_end|><|endoftext|>"), skip_special=True) == "5"


def test_bpe_applies_merges_lowest_rank_first():
    bpe = BPE([("b", "c"), ("a", "b"), ("bc", "d")])
    pieces = [bpe.id_to_token[i] for i in bpe.encode("abcd")]
    assert pieces == ["a", "bcd"]  # (b,c) outranks (a,b), then (bc,d)
    assert [bpe.id_to_token[i] for i in bpe.encode("abab")] == ["ab", "ab"]


def test_decoder_counts_forwards_and_edits_on_scripted_logits():
    """One block, prompt of 30 tokens, 2 answer slots; ids: 0 mask, 1 eos, 2/3 answer tokens."""
    V, mask, eos = 4, 0, 1
    calls = []

    def logits_fn(ids):
        calls.append(ids.copy())
        out = np.zeros((len(ids), V))
        step = len(calls)
        out[30, 2 if step > 1 else 3] = 9.0  # first guess 3 (confident), later corrected to 2
        out[31, eos] = 0.5 if step == 1 else 9.0  # unsure at first, then sure
        return out

    d = decode(logits_fn, [5] * 30, mask_id=mask, eos_id=eos, threshold=0.5, editing_threshold=0.0, gen_length=2)
    # step 1 unmasks slot 30 (=3); step 2 unmasks slot 31 (eos) and edits slot 30 -> 2; step 3: no change, stop
    assert d.tokens == [2, eos] and d.forwards == 3 and d.edits == 1


def test_history_turns_come_from_the_training_split():
    held = tasks.eval_set(60, families=tasks.CHAT_TASKS)
    multi = tasks.with_history(held)
    assert [e.user for e in multi] == [e.user for e in held] and multi == tasks.with_history(held)
    assert all(1 <= len(e.history) <= 2 for e in multi)
    assert not any(tasks.in_eval_split(tasks.Example("h", u, a)) for e in multi for u, a in e.history)
    ex = multi[0]
    (u0, a0), *_ = ex.history
    assert [m["role"] for m in ex.messages()] == ["user", "assistant"] * len(ex.history) + ["user"]
    prompt = tasks.render_prompt(ex)
    assert f"<role>HUMAN</role>{u0}<|role_end|><role>ASSISTANT</role>{a0}<|role_end|>" in prompt
    assert prompt.endswith(f"<role>HUMAN</role>{ex.user}<|role_end|><role>ASSISTANT</role>")
    # training: about history_rate of the stream comes after earlier turns; without it the stream is unchanged
    stream = tasks.stream(0, 2.0, tasks.CHAT_TASKS, history_rate=0.3)
    drawn = [next(stream) for _ in range(1000)]
    assert 0.25 < np.mean([bool(e.history) for e in drawn]) < 0.35
    plain = tasks.stream(0, 2.0, tasks.CHAT_TASKS)
    assert not any(next(plain).history for _ in range(200))


# ---- stage 4: wording families, the help family, wide-operand arithmetic ----

_NUM = r"(\d+)"


def _solve_any_wording(task: str, user: str) -> str | None:
    """An independent solver for the reworded questions: normalise case, spacing and punctuation, then parse the
    question's content (operands and operator, the list after the task word, the counted word, the named fact)."""
    u = " ".join(user.lower().split())
    u = re.sub(r"\s*[?!.=]+\s*$", "", u).strip()
    if task in ("add", "sub"):
        m = (re.fullmatch(rf"(?:what(?:'s| is|s)|how much is|calculate|compute)?\s*{_NUM}\s*(\+|-|plus|minus)\s*{_NUM}\s*=?", u)
             or re.fullmatch(rf"(add) {_NUM} and {_NUM}", u) or re.fullmatch(rf"(subtract) {_NUM} from {_NUM}", u))
        if m is None:
            return None
        g = m.groups()
        if any(v.isdigit() and int(v) > 99 for v in g if v):  # operands outside 0-99: not a question it answers
            return None
        if g[0] == "add":
            return str(int(g[1]) + int(g[2]))
        if g[0] == "subtract":
            return str(int(g[2]) - int(g[1]))
        a, op, b = int(g[0]), g[1], int(g[2])
        return str(a + b if op in ("+", "plus") else a - b)
    if task in ("sort", "reverse", "copy"):
        m = re.fullmatch(r"(sort|reverse|repeat|copy this|copy):? (.+)", u)
        if m is None:
            return None
        items = m.group(2).replace(",", " ").split()
        domain = {"sort": [str(d) for d in range(10)], "reverse": [str(d) for d in range(10)] + list(tasks.LETTERS),
                  "copy": list(tasks.WORDS)}[task]
        if not all(i in domain for i in items):  # outside the task's vocabulary: not a question it answers
            return None
        if task == "sort":
            return " ".join(sorted(items, key=int))
        return " ".join(items[::-1] if task == "reverse" else items)
    if task == "count":
        m = re.fullmatch(r"how many times does (\w+) appear: (.+)", u)
        return None if m is None else str(m.group(2).split().count(m.group(1)))
    table = {k.lower(): v for k, v in (tasks.CAPITALS if task in ("capital", "country") else tasks.COLOURS)}
    hits = [v for k, v in table.items() if re.search(rf"\b{k}\b", u)]
    return hits[0] if len(hits) == 1 else None


def test_reworded_questions_keep_their_answers():
    """Every wording family, seen and unseen, on every chat family: the answer is still the canonical one (checked
    by an independent solver for the short families, by the grammar for the phrasing ones)."""
    rng = np.random.default_rng(11)
    used: set[str] = set()
    for name, gen in tasks.CHAT_TASKS.items():
        for _ in range(40):
            ex = gen(rng)
            for group in tasks.WORDING_GROUPS.values():
                for fam in group:
                    got = tasks.reword(ex, (fam,), rng)
                    if got is None:
                        continue
                    used.add(fam)
                    assert got.answer == ex.answer and got.accept == ex.accept and got.wording == fam
                    if name in tasks.PHRASING_TASKS:
                        assert all(_phrasing_ok(ex, a) for a in got.accept)
                    else:
                        assert _solve_any_wording(name, got.user) == ex.answer, (fam, ex.user, got.user)
            combo = tasks.random_rewording(ex, rng)
            if name not in tasks.PHRASING_TASKS:
                assert _solve_any_wording(name, combo.user) == ex.answer, (ex.user, combo.user, combo.wording)
            assert not set(combo.wording.split("+")) & tasks.UNSEEN_WORDINGS
    assert used == set(tasks.SEEN_WORDINGS | tasks.UNSEEN_WORDINGS)


@pytest.mark.parametrize("user,family,want", [
    ("What is 3 + 4?", "compact", "What is 3+4?"), ("What is 3 plus 4?", "verb", "Add 3 and 4."),
    ("What is 9 minus 4?", "verb", "Subtract 4 from 9."), ("Sort: 9 3 7 1", "nocolon", "Sort 9 3 7 1"),
    ("Copy this: cat dog", "nocolon", "Copy cat dog"), ("What is the capital of Peru?", "upper", "WHAT IS THE CAPITAL OF PERU?"),
    ("What is the capital of France?", "contraction", "What's the capital of France?"),
    ("What is the capital of France?", "lower_names", "What is the capital of france?"),
    ("Reverse: a b c", "upper", None), ("Copy this: cat dog", "title", None), ("Sort: 1 2 3", "contraction", None),
    ("Reverse: 1 2 3", "commas", "Reverse: 1, 2, 3"), ("What is 3 + 4?", "whats", "Whats 3 + 4?"),
])
def test_wording_families_by_example(user, family, want):
    task = "add" if "+" in user or "plus" in user else "sub" if "minus" in user else user.split()[0].lower().rstrip(":")
    task = {"what": "capital", "copy": "copy"}.get(task, task)
    got = tasks.reword(tasks.Example(task, user, "x"), (family,), np.random.default_rng(0))
    assert (got.user if got else None) == want


def test_wording_split_holds_out_items_and_unseen_families():
    """Training (the ``demo`` stream) never sees a held-out question or sum in any wording, nor any unseen wording
    family or help shape; the seen / unseen evaluation sets are held out and cover every family."""
    stream = tasks.stream(0, families=tasks.DEMO_TASKS, history_rate=0.3, weights=tasks.DEMO_WEIGHTS)
    train = [next(stream) for _ in range(4000)]
    assert not any(tasks.in_eval_split(e) for e in train)
    fams = {f for e in train for f in e.wording.split("+")}
    assert fams == set(tasks.SEEN_WORDINGS) | {"plain"}
    assert {e.task for e in train if tasks.is_help(e)} == {f"help:{s}" for s in tasks.HELP_SHAPES}
    counts = {t: sum(e.task.split(":")[0] == t for e in train) / len(train) for t in ("add", "sub", "help")}
    assert 0.12 < counts["add"] < 0.18 and 0.07 < counts["sub"] < 0.13 and 0.12 < counts["help"] < 0.18, counts
    reworded = np.mean([e.wording != "plain" for e in train if not tasks.is_help(e)])
    assert 0.45 < reworded < 0.65
    # arithmetic wordings are split on the item: no sum is trained in another wording if it is held out
    for e in train:
        if e.task in ("add", "sub") and e.wording != "plain":
            a, b = map(int, re.findall(r"\d+", e.user))
            if e.user.lower().startswith("subtract"):
                a, b = b, a
            assert e.key == f"{e.task} {a} {b}" and not tasks.is_heldout(e.key)
    train_users = {e.user for e in train} | {u for e in train for u, _ in e.history}
    seen, unseen = tasks.wording_eval_set(150, seen=True), tasks.wording_eval_set(150, seen=False)
    helps = tasks.help_eval_set(5)
    for held in (seen, unseen, helps):
        assert all(tasks.in_eval_split(e) for e in held) and not {e.user for e in held} & train_users
    assert {f for e in seen for f in e.wording.split("+")} == set(tasks.SEEN_WORDINGS)
    assert all(len(e.wording.split("+")) == 1 and e.wording in tasks.UNSEEN_WORDINGS for e in unseen)
    assert {e.wording for e in unseen} == set(tasks.UNSEEN_WORDINGS)
    assert {e.task for e in helps} == {f"help:{s}" for s in [*tasks.HELP_SHAPES, *tasks.UNSEEN_HELP_SHAPES]}
    assert tasks.wording_eval_set(40, seen=False) == tasks.wording_eval_set(40, seen=False)


def test_help_prompts_get_the_help_reply_and_are_not_task_questions():
    rng = np.random.default_rng(2)
    shapes = {**tasks.HELP_SHAPES, **tasks.UNSEEN_HELP_SHAPES}
    for shape in shapes:
        for _ in range(60):
            ex = tasks.help_example(shape, rng)
            assert ex.answer == tasks.HELP_REPLY and ex.task == f"help:{shape}" and not ex.accept
            # none of them is a question the model can answer: no known task solves it
            for task in ("add", "sub", "sort", "reverse", "copy", "count"):
                assert _solve_any_wording(task, ex.user) is None, (shape, ex.user, task)
            low = ex.user.lower()
            assert not any(re.search(rf"\b{c.lower()}\b", low) for c, _ in tasks.CAPITALS), ex.user
    # the reply names what the model can do and the chat banner's two examples, and fits one answer
    assert "What is 12 + 7?" in tasks.HELP_REPLY and "Tell me about the banana." in tasks.HELP_REPLY
    assert tasks.HELP_REPLY.startswith("I am dllm's tiny demo model.") and len(tasks.HELP_REPLY) < 200


def test_first_messages_and_wide_operands():
    for user, want in tasks.FIRST_MESSAGES:
        if want != tasks.HELP_REPLY:
            task = "capital" if "capital" in user.lower() else "sort" if "sort" in user else "add"
            assert _solve_any_wording(task, user) == want, user
    rng = np.random.default_rng(0)
    adds = [tasks.gen_add_wide(rng) for _ in range(3000)]
    ops = np.array([list(map(int, re.findall(r"\d+", e.user))) for e in adds])
    assert all(e.answer == str(a + b) for e, (a, b) in zip(adds, ops))
    assert 0.25 < np.mean(ops < 10) < 0.35 and ops.max() == 99 and ops.min() == 0
    subs = [tasks.gen_sub_wide(rng) for _ in range(500)]
    assert all(e.answer == str(a - b) and a >= b for e in subs for a, b in [map(int, re.findall(r"\d+", e.user))])
