"""Synthetic chat tasks for the embedded demo model: seeded generators, a held-out split, exact checking.

Every task has a short answer that can be checked exactly. The split is a pure function of the user
message (``is_heldout``), so training and evaluation examples never share a question, whatever the seed.
Fact questions generalise over phrasing: each fact keeps one question template for evaluation only.
"""
from __future__ import annotations

import hashlib
import itertools
import re
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Callable, Iterator

import numpy as np
from jinja2 import Environment

from dllm_cli.demo.tokenizer import CHAT_TEMPLATE

BLOCK_LENGTH = 32
EOS = "<|endoftext|>"
ROLE_END = "<|role_end|>"

WORDS = ("cat", "dog", "sun", "tree", "book", "fish", "bird", "star", "milk", "rain", "door", "lamp",
         "ship", "cake", "moon", "frog", "rose", "coat", "ring", "bell")
LETTERS = tuple("abcdefghijklmnopqrstuvwxyz")
CAPITALS = (("France", "Paris"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Germany", "Berlin"),
            ("Japan", "Tokyo"), ("Egypt", "Cairo"), ("Peru", "Lima"), ("Kenya", "Nairobi"),
            ("Norway", "Oslo"), ("Greece", "Athens"), ("Canada", "Ottawa"), ("Chile", "Santiago"),
            ("Cuba", "Havana"), ("Poland", "Warsaw"), ("Ireland", "Dublin"), ("Austria", "Vienna"))
COLOURS = (("banana", "yellow"), ("grass", "green"), ("sky", "blue"), ("snow", "white"), ("coal", "black"),
           ("tomato", "red"), ("orange", "orange"), ("lemon", "yellow"), ("cherry", "red"),
           ("leaf", "green"), ("ocean", "blue"), ("carrot", "orange"), ("cloud", "white"), ("crow", "black"))
SYSTEM_PROMPTS = ("You are a helpful assistant.", "You are a careful assistant. Answer briefly.",
                  "Answer the question with the answer only.")

CAPITAL_TEMPLATES = ("What is the capital of {x}?", "Name the capital of {x}.", "Capital of {x}?",
                     "Which city is the capital of {x}?")
COLOUR_TEMPLATES = ("What colour is {x}?", "Name the colour of {x}.", "Colour of {x}?",
                    "Which colour does {x} have?")

# Long-answer families (12-40 tokens: answers fill most of a block or spill into the next one). Their later
# tokens depend on the earlier ones, so a parallel decoder is unsure of them until the prefix is fixed.
SPELL_WORDS = ("elephant", "mountain", "computer", "umbrella", "triangle", "sandwich", "keyboard", "dinosaur",
               "pineapple", "butterfly", "chocolate", "telephone", "hospital", "calendar", "envelope", "kangaroo",
               "magazine", "notebook", "octopus", "penguin", "question", "rainbow", "scissors", "strawberry",
               "tomorrow", "universe", "vacation", "whistle", "yesterday", "airplane", "backpack", "blanket",
               "cucumber", "diamond", "festival", "giraffe", "hamburger", "internet", "jellyfish", "lemonade")
SPELL_TEMPLATES = ("Spell {x}.", "Spell the word {x}.", "How do you spell {x}?", "Write {x} letter by letter.")
RANGE_TEMPLATES = ("Count from {a} to {b}.", "List the numbers from {a} to {b}.", "Write the numbers {a} to {b}.")
REPEAT_TEMPLATES = ("Say {p} {n} times.", "Write {p} {n} times.")
CAPITALS_TEMPLATES = ("Name the capitals of {a}, {b} and {c}.", "Capitals of {a}, {b} and {c}?")

# Phrasing families: open questions whose answer is a sentence with free wording, like ordinary chat. A
# phrasing is fixed text and (preferred, alternative) word choices; the training data takes the preferred
# wording of each choice with probability PREFERRED, independently, and every combination is a correct
# answer. The choices are the genuine uncertainty of natural text: a decoder cannot know which wording it
# will get until it commits one, which is where the speed and quality modes of LLaDA2.1 differ. Both words
# of a choice have the same number of tokens, so the rest of the sentence does not shift.
PREFERRED = 0.6
Phrasing = tuple[str | tuple[str, str], ...]
OPINION: Phrasing = (("The", "This"), " {x} is", (" very", " quite"), (" nice", " good"), (".", "!"), " I",
                     (" like", " want"), " it", (".", "!"))
OBJECT: Phrasing = (("The", "This"), " {x} is {c}", (".", "!"), " It is", (" a very", " quite a"),
                    (" nice", " good"), " colour", (".", "!"))
COUNTRY: Phrasing = (("Well", "So"), ", the capital of {x} is {c}", (".", "!"), " It is", (" a very", " quite a"),
                     (" nice", " great"), " city", (".", "!"))
NUMBER: Phrasing = (("Well", "So"), ", {x} is an {c} number", (".", "!"), " It is", (" a very", " quite a"),
                    (" nice", " good"), " number", (".", "!"))
PARITIES = tuple((str(v), "odd" if v % 2 else "even") for v in range(100))  # the number family's facts
NUMBER_TEMPLATES = ("Tell me about the number {x}.", "What do you think of the number {x}?",
                    "Describe the number {x}.", "Say something about the number {x}.")
ABOUT_THE_TEMPLATES = ("What do you think of the {x}?", "Tell me about the {x}.", "Describe the {x}.",
                       "Say something about the {x}.")
ABOUT_TEMPLATES = ("What do you think of {x}?", "Tell me about {x}.", "Describe {x}.", "Say something about {x}.")


@dataclass(frozen=True)
class Example:
    """One chat example: the task name, the user message, the exact answer, an optional system prompt."""

    task: str
    user: str
    answer: str  # the training target (one wording)
    system: str | None = None
    accept: tuple[str, ...] = ()  # every correct answer, for questions with free wording (else just ``answer``)
    history: tuple[tuple[str, str], ...] = ()  # earlier (question, answer) turns of the conversation
    key: str = ""  # what the split is decided on, when not ``user`` (a reworded question: its item, see ``vary``)
    wording: str = "plain"  # the wording families applied to the canonical question ("lower+no_punct", ...)

    def messages(self) -> list[dict[str, str]]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        for user, answer in self.history:
            head += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
        return head + [{"role": "user", "content": self.user}]


def is_heldout(user: str) -> bool:
    """True for the ~10% of questions reserved for evaluation (a hash of the user message)."""
    return hashlib.sha256(user.encode()).digest()[0] % 10 == 0


def _nums(rng: np.random.Generator, n: int, hi: int = 10) -> list[int]:
    return [int(v) for v in rng.integers(0, hi, size=n)]


def gen_add(rng: np.random.Generator) -> Example:
    a, b = (int(v) for v in rng.integers(0, 100, size=2))
    form = ("What is {a} + {b}?", "What is {a} plus {b}?", "Add {a} and {b}.")[int(rng.integers(3))]
    return Example("add", form.format(a=a, b=b), str(a + b))


def gen_sub(rng: np.random.Generator) -> Example:
    a, b = sorted((int(v) for v in rng.integers(0, 100, size=2)), reverse=True)
    form = ("What is {a} - {b}?", "What is {a} minus {b}?")[int(rng.integers(2))]
    return Example("sub", form.format(a=a, b=b), str(a - b))


def gen_copy(rng: np.random.Generator) -> Example:
    words = [WORDS[i] for i in rng.integers(0, len(WORDS), size=int(rng.integers(2, 5)))]
    form = ("Repeat: {s}", "Copy this: {s}")[int(rng.integers(2))]
    return Example("copy", form.format(s=" ".join(words)), " ".join(words))


def _reverse(rng: np.random.Generator, task: str, lo: int, hi: int) -> Example:
    """``Reverse:`` with lo..hi-1 letters or digits."""
    n = int(rng.integers(lo, hi))
    items = [LETTERS[i] for i in rng.integers(0, 26, size=n)] if rng.random() < 0.5 else [str(v) for v in _nums(rng, n)]
    return Example(task, "Reverse: " + " ".join(items), " ".join(reversed(items)))


def _sort(rng: np.random.Generator, task: str, lo: int, hi: int) -> Example:
    """``Sort:`` with lo..hi-1 digits."""
    items = _nums(rng, int(rng.integers(lo, hi)))
    return Example(task, "Sort: " + " ".join(map(str, items)), " ".join(map(str, sorted(items))))


def gen_reverse(rng: np.random.Generator) -> Example:
    return _reverse(rng, "reverse", 3, 7)


def gen_sort(rng: np.random.Generator) -> Example:
    return _sort(rng, "sort", 3, 7)


def gen_count(rng: np.random.Generator) -> Example:
    word = WORDS[int(rng.integers(len(WORDS)))]
    n = int(rng.integers(1, 10))
    return Example("count", f"How many times does {word} appear: " + " ".join([word] * n) + "?", str(n))


def _fact(rng: np.random.Generator, table, templates, task: str, article: bool) -> Example:
    i = int(rng.integers(len(table)))
    name, answer = table[i]
    t = int(rng.integers(len(templates)))
    x = ("the " + name) if article else name
    return Example(task, templates[t].format(x=x), answer)


def gen_capital(rng: np.random.Generator) -> Example:
    return _fact(rng, CAPITALS, CAPITAL_TEMPLATES, "capital", article=False)


def gen_colour(rng: np.random.Generator) -> Example:
    return _fact(rng, COLOURS, COLOUR_TEMPLATES, "colour", article=True)


def gen_range(rng: np.random.Generator) -> Example:
    """``Count from 7 to 19.`` -> ``7 8 9 ... 19`` (8-14 numbers, 0-99)."""
    n = int(rng.integers(8, 15))
    a = int(rng.integers(0, 101 - n))
    form = RANGE_TEMPLATES[int(rng.integers(len(RANGE_TEMPLATES)))]
    return Example("range", form.format(a=a, b=a + n - 1), " ".join(str(v) for v in range(a, a + n)))


def gen_spell(rng: np.random.Generator) -> Example:
    """``Spell elephant.`` -> ``e l e p h a n t`` (a fact table: word i is held out in template i % 4)."""
    i = int(rng.integers(len(SPELL_WORDS)))
    word = SPELL_WORDS[i]
    form = SPELL_TEMPLATES[int(rng.integers(len(SPELL_TEMPLATES)))]
    return Example("spell", form.format(x=word), " ".join(word))


def gen_repeat(rng: np.random.Generator) -> Example:
    """``Say cat dog 3 times.`` -> ``cat dog cat dog cat dog`` (1-3 words, 3-7 times)."""
    words = [WORDS[i] for i in rng.integers(0, len(WORDS), size=int(rng.integers(1, 4)))]
    n = int(rng.integers(3, 8))
    form = REPEAT_TEMPLATES[int(rng.integers(len(REPEAT_TEMPLATES)))]
    return Example("repeat", form.format(p=" ".join(words), n=n), " ".join(words * n))


def gen_capitals(rng: np.random.Generator) -> Example:
    """``Capitals of France, Peru and Japan?`` -> ``Paris, Lima, Tokyo`` (3 distinct countries)."""
    idx = [int(i) for i in rng.choice(len(CAPITALS), size=3, replace=False)]
    form = CAPITALS_TEMPLATES[int(rng.integers(len(CAPITALS_TEMPLATES)))]
    names = [CAPITALS[i][0] for i in idx]
    return Example("capitals", form.format(a=names[0], b=names[1], c=names[2]),
                   ", ".join(CAPITALS[i][1] for i in idx))


def gen_reverse_long(rng: np.random.Generator) -> Example:
    return _reverse(rng, "reverse_long", 8, 13)


def gen_sort_long(rng: np.random.Generator) -> Example:
    return _sort(rng, "sort_long", 8, 13)


def phrase(rng: np.random.Generator, parts: Phrasing, **fields: str) -> tuple[str, tuple[str, ...]]:
    """One wording of ``parts`` (each choice preferred with probability ``PREFERRED``) and all correct ones."""
    pick = "".join(p if isinstance(p, str) else p[0 if rng.random() < PREFERRED else 1] for p in parts)
    every = ("".join(c) for c in itertools.product(*((p,) if isinstance(p, str) else p for p in parts)))
    return pick.format(**fields), tuple(sorted(w.format(**fields) for w in every))


def _about(rng: np.random.Generator, task: str, table, templates, parts: Phrasing) -> Example:
    """An open question about item i of ``table`` (held out in template i % 4, like the fact tables)."""
    item = table[int(rng.integers(len(table)))]
    name, fact = (item, "") if isinstance(item, str) else item
    answer, accept = phrase(rng, parts, x=name, c=fact)
    return Example(task, templates[int(rng.integers(len(templates)))].format(x=name), answer, accept=accept)


def gen_opinion(rng: np.random.Generator) -> Example:
    """``Describe the cat.`` -> ``The cat is very nice. I like it.`` (2^6 wordings)."""
    return _about(rng, "opinion", WORDS, ABOUT_THE_TEMPLATES, OPINION)


def gen_object(rng: np.random.Generator) -> Example:
    """``Tell me about the banana.`` -> ``The banana is yellow. It is a very nice colour.`` (2^5 wordings)."""
    return _about(rng, "object", COLOURS, ABOUT_THE_TEMPLATES, OBJECT)


def gen_country(rng: np.random.Generator) -> Example:
    """``Describe France.`` -> ``Well, the capital of France is Paris. It is a very nice city.`` (2^5 wordings)."""
    return _about(rng, "country", CAPITALS, ABOUT_TEMPLATES, COUNTRY)


def gen_number(rng: np.random.Generator) -> Example:
    """``Describe the number 42.`` -> ``Well, 42 is an even number. It is a very nice number.`` (2^5 wordings)."""
    return _about(rng, "number", PARITIES, NUMBER_TEMPLATES, NUMBER)


Generator = Callable[[np.random.Generator], Example]
# The eight short-answer families (stages 1-2 of the shipped recipe, and the default mixture of the helpers below).
TASKS: dict[str, Generator] = {
    "add": gen_add, "sub": gen_sub, "copy": gen_copy, "reverse": gen_reverse, "sort": gen_sort,
    "count": gen_count, "capital": gen_capital, "colour": gen_colour,
}
# Long-answer families (opt-in: ``families=ALL_TASKS``, ``--families all``).
LONG_TASKS: dict[str, Generator] = {
    "range": gen_range, "spell": gen_spell, "repeat": gen_repeat, "capitals": gen_capitals,
    "reverse_long": gen_reverse_long, "sort_long": gen_sort_long,
}
ALL_TASKS: dict[str, Generator] = {**TASKS, **LONG_TASKS}
PHRASING_TASKS: dict[str, Generator] = {"opinion": gen_opinion, "object": gen_object, "country": gen_country,
                                        "number": gen_number}
CHAT_TASKS: dict[str, Generator] = {**TASKS, **PHRASING_TASKS}  # the shipped model's (stage 3) and eval mixture
FAMILIES: dict[str, dict[str, Generator]] = {"short": TASKS, "chat": CHAT_TASKS, "all": ALL_TASKS}


# ---------------------------------------------------------------------------------------------------------------
# Stage 4: ordinary variation in wording, and one learned answer for everything the model cannot do.
#
# A question is generated in its canonical wording (the generators above) and then reworded by *wording families*
# in four groups, at most one family per group: structure (another frame for the same question), case,
# punctuation, spacing. Some families are held out of training entirely (UNSEEN_WORDINGS): questions reworded by
# them are only ever evaluated, as "unseen wordings", apart from the seen ones. A reworded question is split on
# its canonical question (``Example.key``), or for the arithmetic on its item (``add 25 9``), so no wording of
# a held-out question or sum is trained.

HELP_REPLY = ("I am dllm's tiny demo model. I can add, subtract, sort, reverse, copy and count, and name capitals "
              "and colours. Try: What is 12 + 7? or Tell me about the banana.")

_ARITH = re.compile(r"What is (\d+) (\+|-|plus|minus) (\d+)\?|Add (\d+) and (\d+)\.")
_LIST = re.compile(r"(Sort|Reverse|Repeat|Copy this): (.+)")
_NAMES = {n for n, _ in CAPITALS} | {n for n, _ in COLOURS}


def _arith(user: str) -> tuple[int, str, int] | None:
    """(a, '+' or '-', b) of a canonical add / sub question."""
    m = _ARITH.fullmatch(user)
    if not m:
        return None
    if m.group(4) is not None:
        return int(m.group(4)), "+", int(m.group(5))
    return int(m.group(1)), "+" if m.group(2) in ("+", "plus") else "-", int(m.group(3))


def _pick(rng: np.random.Generator, options: tuple[str, ...] | list[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _op_word(op: str) -> str:
    return "plus" if op == "+" else "minus"


# structure: another frame for the same question (task, canonical question, rng) -> question or None
def _w_contraction(task: str, u: str, rng: np.random.Generator) -> str | None:
    return "What's " + u[len("What is "):] if u.startswith("What is ") else None


def _w_compact(task: str, u: str, rng: np.random.Generator) -> str | None:
    p = _arith(u)
    return None if p is None else f"What is {p[0]}{p[1]}{p[2]}?"


def _w_bare(task: str, u: str, rng: np.random.Generator) -> str | None:
    p = _arith(u)
    if p is None:
        return None
    a, op, b = p
    return _pick(rng, (f"{a} {op} {b}", f"{a}{op}{b}", f"{a} {_op_word(op)} {b}"))


def _w_equals(task: str, u: str, rng: np.random.Generator) -> str | None:
    p = _arith(u)
    if p is None:
        return None
    a, op, b = p
    return _pick(rng, (f"{a}{op}{b}=?", f"{a} {op} {b} = ?", f"{a} {op} {b} =", f"{a}{op}{b}="))


def _w_verb(task: str, u: str, rng: np.random.Generator) -> str | None:
    p = _arith(u)
    if p is None:
        return None
    a, op, b = p
    return f"Add {a} and {b}." if op == "+" else f"Subtract {b} from {a}."


def _w_nocolon(task: str, u: str, rng: np.random.Generator) -> str | None:
    m = _LIST.fullmatch(u)
    if not m:
        return None
    word = "Copy" if m.group(1) == "Copy this" else m.group(1)
    return f"{word} {m.group(2)}"


# unseen structures (evaluation only)
def _w_how_much(task: str, u: str, rng: np.random.Generator) -> str | None:
    p = _arith(u)
    return None if p is None else f"How much is {p[0]} {_pick(rng, (p[1], _op_word(p[1])))} {p[2]}?"


def _w_calculate(task: str, u: str, rng: np.random.Generator) -> str | None:
    p = _arith(u)
    return None if p is None else f"{_pick(rng, ('Calculate', 'Compute'))} {p[0]} {p[1]} {p[2]}."


def _w_whats(task: str, u: str, rng: np.random.Generator) -> str | None:
    return "Whats " + u[len("What is "):] if u.startswith("What is ") else None


def _w_commas(task: str, u: str, rng: np.random.Generator) -> str | None:
    m = _LIST.fullmatch(u)
    if not m or m.group(1) not in ("Sort", "Reverse"):
        return None
    return f"{m.group(1)}: " + ", ".join(m.group(2).split())


def _case_safe(task: str, u: str) -> bool:
    """Upper / title case keep the answer well defined: not for copying words or reversing letters."""
    if task == "copy":
        return False
    m = _LIST.fullmatch(u)
    return not (task == "reverse" and m is not None and any(c.isalpha() for c in m.group(2)))


# case
def _w_lower(task: str, u: str, rng: np.random.Generator) -> str | None:
    return u.lower() if u.lower() != u else None


def _w_upper(task: str, u: str, rng: np.random.Generator) -> str | None:
    return u.upper() if _case_safe(task, u) and u.upper() != u else None


def _w_lower_names(task: str, u: str, rng: np.random.Generator) -> str | None:
    names = [n for n in _NAMES if re.search(rf"\b{n}\b", u) and n.lower() != n]
    if not names:
        return None
    for n in names:
        u = re.sub(rf"\b{n}\b", n.lower(), u)
    return u


def _w_title(task: str, u: str, rng: np.random.Generator) -> str | None:
    t = " ".join(w[:1].upper() + w[1:] for w in u.split(" "))
    return t if _case_safe(task, u) and t != u else None


# punctuation
def _w_no_punct(task: str, u: str, rng: np.random.Generator) -> str | None:
    return u[:-1] if u[-1:] in ("?", ".", "!") else None


def _w_extra_punct(task: str, u: str, rng: np.random.Generator) -> str | None:
    if u.endswith("?"):
        return u + _pick(rng, ("?", "!", "??"))
    if u.endswith("."):
        return u[:-1] + _pick(rng, ("!", "..", "?"))
    return u + _pick(rng, ("?", "!"))


def _w_space_punct(task: str, u: str, rng: np.random.Generator) -> str | None:
    return u[:-1] + " " + u[-1] if u[-1:] in ("?", ".", "!") else None


# spacing
def _w_trailing(task: str, u: str, rng: np.random.Generator) -> str | None:
    return u + _pick(rng, (" ", "  ", " \n", "\n"))


def _w_double_space(task: str, u: str, rng: np.random.Generator) -> str | None:
    return u.replace(" ", "  ") if " " in u else None


Rewording = Callable[[str, str, np.random.Generator], "str | None"]
# group -> {family: rewording}; the groups apply in this order, at most one family each
WORDING_GROUPS: dict[str, dict[str, Rewording]] = {
    "structure": {"contraction": _w_contraction, "compact": _w_compact, "bare": _w_bare, "equals": _w_equals,
                  "verb": _w_verb, "nocolon": _w_nocolon,
                  "how_much": _w_how_much, "calculate": _w_calculate, "whats": _w_whats, "commas": _w_commas},
    "case": {"lower": _w_lower, "upper": _w_upper, "lower_names": _w_lower_names, "title": _w_title},
    "punct": {"no_punct": _w_no_punct, "extra_punct": _w_extra_punct, "space_punct": _w_space_punct},
    "space": {"trailing": _w_trailing, "double_space": _w_double_space},
}
# held out of training entirely: evaluated as "unseen wordings"
UNSEEN_WORDINGS = frozenset({"how_much", "calculate", "whats", "commas", "title", "space_punct", "double_space"})
SEEN_WORDINGS = frozenset(f for g in WORDING_GROUPS.values() for f in g) - UNSEEN_WORDINGS
REWORD_RATE = 0.6  # share of training questions that are reworded
_GROUP_RATE = {"structure": 0.6, "case": 0.5, "punct": 0.5, "space": 0.2}


def reword(ex: Example, families: tuple[str, ...], rng: np.random.Generator) -> Example | None:
    """``ex`` (canonical) reworded by ``families`` in group order; None when one of them does not apply."""
    user = ex.user
    for name in families:
        fn = next(g[name] for g in WORDING_GROUPS.values() if name in g)
        out = fn(ex.task, user, rng)
        if out is None:
            return None
        user = out
    p = _arith(ex.user)  # a sum (also one out of range, of the help family) is split on its item
    key = f"{ex.task} {p[0]} {p[2]}" if p is not None and families else ex.key or ex.user
    return replace(ex, user=user, key=key, wording="+".join(families) if families else "plain")


def random_rewording(ex: Example, rng: np.random.Generator, allowed: frozenset[str] = SEEN_WORDINGS) -> Example:
    """A random combination of ``allowed`` families (at least one that applies), or ``ex`` if none applies."""
    for _ in range(20):
        chosen = []
        for group, fams in WORDING_GROUPS.items():
            names = [f for f in fams if f in allowed]
            if names and rng.random() < _GROUP_RATE[group]:
                chosen.append(names[int(rng.integers(len(names)))])
        if not chosen:
            continue
        out = reword(ex, tuple(chosen), rng)
        if out is not None and out.user != ex.user:
            return out
    return ex


def varied(gen: Generator, rate: float = REWORD_RATE) -> Generator:
    """``gen`` with a ``rate`` share of its questions reworded by seen wording families."""
    def g(rng: np.random.Generator) -> Example:
        ex = gen(rng)
        return random_rewording(ex, rng) if rng.random() < rate else ex
    return g


def _digits(rng: np.random.Generator) -> int:
    """An operand in 0-99: one digit with probability 0.3 (so one-digit sums are not rare), else two."""
    return int(rng.integers(0, 10)) if rng.random() < 0.3 else int(rng.integers(10, 100))


def gen_add_wide(rng: np.random.Generator) -> Example:
    """``add`` with operands covering one- and two-digit numbers evenly (stage 4); canonical wordings of ``gen_add``."""
    a, b = _digits(rng), _digits(rng)
    form = ("What is {a} + {b}?", "What is {a} plus {b}?", "Add {a} and {b}.")[int(rng.integers(3))]
    return Example("add", form.format(a=a, b=b), str(a + b))


def gen_sub_wide(rng: np.random.Generator) -> Example:
    a, b = sorted((_digits(rng), _digits(rng)), reverse=True)
    form = ("What is {a} - {b}?", "What is {a} minus {b}?")[int(rng.integers(2))]
    return Example("sub", form.format(a=a, b=b), str(a - b))


# ---- the help family: greetings, questions about the model, and everything out of scope -> HELP_REPLY ----
_THINGS = ("cats", "dogs", "computers", "the weather", "school", "pizza", "football", "music", "the moon", "trains",
           "doctors", "programmers", "bananas", "the ocean", "birds", "robots", "coffee", "teachers")
_VERBS = ("sort a list", "reverse a string", "read a file", "add two numbers", "print hello world", "count words",
          "parse json", "make a web server", "find the maximum", "download a page", "open a window")
_LANGS = ("python", "javascript", "c", "rust", "java", "go", "bash", "sql", "c++", "haskell")
_SNIPPETS = ("print(x)", "for i in range(10): print(i)", "def f(x): return x * 2", "int main() { return 0; }",
             "SELECT * FROM users;", "console.log('hi')", "x = [1, 2, 3]", "while True: pass", "import os",
             "let x = 5;", "fn main() {}", "echo $HOME")
_OTHER_LANGUAGE = ("Bonjour", "Bonjour, comment ça va ?", "Comment tu t'appelles ?", "Merci beaucoup", "Hola",
                   "¿Cómo estás?", "¿Qué hora es?", "¿Dónde está el baño?", "Guten Tag", "Wie geht es dir?",
                   "Was ist das?", "Ciao", "Come stai?", "Grazie mille", "Olá", "Tudo bem?", "Obrigado", "Hallo",
                   "Hoe gaat het?", "Hej", "Hur mår du?", "Merhaba", "Nasılsın?", "Namaste", "你好", "你是谁？",
                   "谢谢", "今天天气怎么样？", "こんにちは", "ありがとう", "元気ですか？", "Привет", "Как дела?",
                   "Спасибо", "안녕하세요", "مرحبا", "שלום", "Γεια σου", "Cześć", "Dzień dobry", "Ahoj", "Jambo",
                   "Salut, ça va ?", "Quel âge as-tu ?", "Ich habe Hunger", "Buenos días", "Buona notte")
_SALAD = ("apple", "river", "blue", "quickly", "table", "happy", "window", "seven", "under", "green", "music",
          "paper", "walk", "yesterday", "bottle", "purple", "mountain", "slowly", "chair", "garden", "phone",
          "water", "light", "dance", "number", "cloud", "capital", "colour", "sort", "copy", "what", "the", "is")
_UNKNOWN_COUNTRIES = ("Brazil", "China", "India", "Mexico", "Russia", "Sweden", "Finland", "Turkey", "Nigeria",
                      "Argentina", "Portugal", "Denmark", "Vietnam", "Thailand", "Iran", "Australia", "Colombia",
                      "Morocco", "Hungary", "Belgium", "Ghana", "Nepal", "Iceland", "Chad")
_UNKNOWN_OBJECTS = ("car", "house", "phone", "chair", "shirt", "bicycle", "table", "computer", "pencil", "cup",
                    "window", "unicorn", "dragon", "planet", "river", "mountain", "robot", "guitar")

HelpShape = Callable[[np.random.Generator], str]


def _h_greeting(rng: np.random.Generator) -> str:
    return _pick(rng, ("Hello", "Hi", "Hey", "Hello there", "Hi there", "Hey there", "Good morning", "Good evening",
                       "Good afternoon", "Howdy", "Greetings", "Yo", "Hiya", "Hello!", "Hi!", "Hey!", "Morning",
                       "Hello, how are you?", "Hi, how are you?", "Hey, what's up?", "What's up?", "Sup",
                       "Hello bot", "Hi friend", "Nice to meet you", "Hello, anyone there?"))


def _h_who(rng: np.random.Generator) -> str:
    return _pick(rng, ("Who are you?", "What are you?", "What is your name?", "What's your name?",
                       "Are you a robot?", "Are you human?", "Who made you?", "Introduce yourself.",
                       "Tell me about yourself.", "Hi, who are you?", "Hello, what are you?", "Are you an AI?",
                       "Which model are you?", "Are you ChatGPT?", "Who am I talking to?", "What model is this?",
                       "Do you have a name?", "Who built you?"))


def _h_help(rng: np.random.Generator) -> str:
    return _pick(rng, ("help", "Help", "Help me", "Help!", "Help me please", "I need help", "Can you help me?",
                       "How does this work?", "How do I use you?", "What should I ask?", "What can I ask?",
                       "/help", "?", "??", "commands", "usage", "instructions", "info", "menu", "options",
                       "start", "How do I start?", "Please help", "What do I do?", "Show me examples"))


def _h_what_can(rng: np.random.Generator) -> str:
    return _pick(rng, ("What can you do?", "What do you know?", "What are you good at?", "What can I ask you?",
                       "What tasks can you do?", "What are your skills?", "What can you help with?",
                       "What do you do?", "Can you do anything?", "Hi, what can you do?", "What are you for?",
                       "Which questions can you answer?", "What questions do you understand?", "Any examples?",
                       "List your abilities.", "Show me what you can do."))


def _h_joke(rng: np.random.Generator) -> str:
    return _pick(rng, ("Tell me a joke", "Tell me a funny joke", "Make me laugh", "Say something funny",
                       "Do you know any jokes?", f"Tell me a joke about {_pick(rng, _THINGS)}", "A joke please",
                       "Tell me a pun", f"Make a joke about {_pick(rng, _THINGS)}", "Why did the chicken cross the road?",
                       "Knock knock", "Tell me something funny", "I want to hear a joke"))


def _h_code(rng: np.random.Generator) -> str:
    lang, verb, snip = _pick(rng, _LANGS), _pick(rng, _VERBS), _pick(rng, _SNIPPETS)
    return _pick(rng, (f"Write a {lang} function to {verb}", f"How do I {verb} in {lang}?",
                       f"Write code to {verb}.", f"Fix this code: {snip}", f"What does this code do? {snip}",
                       f"Can you write {lang} code that can {verb}?", f"{snip}", f"Explain {snip}",
                       f"Write a program that can {verb}", f"Why does my {lang} code fail? {snip}",
                       f"Implement quicksort in {lang}", f"Write a {lang} script"))


def _h_long(rng: np.random.Generator) -> str:
    a, b = _pick(rng, _THINGS), _pick(rng, _THINGS)
    return _pick(rng, (f"I was wondering if you could explain to me why {a} are so different from {b}, "
                       "because I have been thinking about it for a long time?",
                       f"Can you please give me a detailed explanation of how {a} work and what the most "
                       f"important things to know about {b} are?",
                       f"My friend told me that {a} are better than {b}, but I am not sure, what do you think "
                       "about that and why?",
                       f"If you had to write an essay about {a} and {b}, what would be the main points and how "
                       "would you structure it?",
                       f"What is the history of {a}, and how did people in the past think about {b}?",
                       f"Could you compare {a} and {b} for me and tell me which one is more interesting to learn about?",
                       f"Explain in simple words, as if I were five years old, how {a} and {b} are related."))


def _h_language(rng: np.random.Generator) -> str:
    return _pick(rng, _OTHER_LANGUAGE)


def _h_gibberish(rng: np.random.Generator) -> str:
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = ["".join(letters[int(i)] for i in rng.integers(0, 26, size=int(rng.integers(2, 9))))
             for _ in range(int(rng.integers(1, 4)))]
    out = " ".join(words)
    return _pick(rng, (out, out.upper(), out + "?", out + "!!", _pick(rng, ("asdf", "qwerty", "asdfgh", "zzz",
                                                                           "hmm", "lol", "ok", "???", "...", "#$%&"))))


def _h_salad(rng: np.random.Generator) -> str:
    words = [_SALAD[int(i)] for i in rng.integers(0, len(_SALAD), size=int(rng.integers(3, 8)))]
    out = " ".join(words)
    return out[0].upper() + out[1:] + _pick(rng, ("", ".", "?"))


def _h_chitchat(rng: np.random.Generator) -> str:
    return _pick(rng, ("How are you?", "Thank you", "Thanks!", "Bye", "Goodbye", "OK", "Cool", "Nice", "Wow",
                       "What time is it?", "What's the weather like?", "How old are you?", "Do you like music?",
                       "I love you", "What is the meaning of life?", "Are you there?", "Good night",
                       "What day is it today?", "I am bored", "Where do you live?", "Do you dream?", "Yes", "No",
                       "Why?", "Sorry", "What is love?", "Can we be friends?", "You are great"))


def _h_unknown_fact(rng: np.random.Generator) -> str:
    """Facts the model does not have: countries and objects outside its tables, numbers outside 0-99, other sums."""
    c, o = _pick(rng, _UNKNOWN_COUNTRIES), _pick(rng, _UNKNOWN_OBJECTS)
    big = int(rng.integers(100, 1000))
    n = int(rng.integers(0, 100))
    return _pick(rng, (f"What is the capital of {c}?", f"Capital of {c}?", f"Tell me about {c}.",
                       f"What colour is the {o}?", f"Describe the {o}.", f"What is {big} + {n}?",
                       f"What is {n} times {int(rng.integers(2, 10))}?", f"What is {big} - {n}?",
                       f"What is {n} * {int(rng.integers(2, 10))}?", f"What is {n} divided by {int(rng.integers(2, 10))}?",
                       f"Who is the president of {c}?", f"What is the population of {c}?",
                       f"How tall is the {o}?", f"What is the square root of {n}?"))


# unseen shapes: never trained, evaluated only
def _h_request(rng: np.random.Generator) -> str:
    t = _pick(rng, _THINGS)
    return _pick(rng, (f"Write a poem about {t}", f"Give me a recipe for {_pick(rng, ('soup', 'bread', 'cake'))}",
                       f"Summarize this: {t} are nice and I like them.", "Translate hello into French",
                       f"Write an email to my boss about {t}", f"Give me three facts about {t}",
                       "How do I bake bread?", "Plan a trip to the mountains", f"Draw a picture of {t}"))


def _h_symbols(rng: np.random.Generator) -> str:
    return _pick(rng, ("🙂", "👋", "😂😂", "👍", "❤️", ":)", ":-(", "<3", "¯\\_(ツ)_/¯", "…", "!!!", "@@", "+++",
                       "🤔?", "🎉🎉🎉", "^_^"))


HELP_SHAPES: dict[str, HelpShape] = {
    "greeting": _h_greeting, "who": _h_who, "help": _h_help, "what_can": _h_what_can, "joke": _h_joke,
    "code": _h_code, "long": _h_long, "language": _h_language, "gibberish": _h_gibberish, "salad": _h_salad,
    "chitchat": _h_chitchat, "unknown_fact": _h_unknown_fact,
}
UNSEEN_HELP_SHAPES: dict[str, HelpShape] = {"request": _h_request, "symbols": _h_symbols}
_HELP_WORDINGS = frozenset({"lower", "upper", "no_punct", "extra_punct", "trailing"})


def help_example(shape: str, rng: np.random.Generator, reword_rate: float = 0.5) -> Example:
    """One prompt of help ``shape`` answered with HELP_REPLY (reworded by case / punctuation / spacing families)."""
    base = {**HELP_SHAPES, **UNSEEN_HELP_SHAPES}[shape](rng)
    # split on the prompt without case, end punctuation and spacing: every rewording of it falls on the same side
    ex = Example(f"help:{shape}", base, HELP_REPLY, key="help: " + re.sub(r"[\s?!.]+$", "", base.lower()))
    if rng.random() < reword_rate:
        ex = random_rewording(ex, rng, _HELP_WORDINGS)
    return ex


def gen_help(rng: np.random.Generator) -> Example:
    """A prompt of one of the seen help shapes (training and the seen half of the help evaluation)."""
    return help_example(_pick(rng, list(HELP_SHAPES)), rng)


def is_help(ex: Example) -> bool:
    return ex.task.startswith("help")


# The stage-4 mixture: every chat family reworded, wide-operand arithmetic, and the help family.
DEMO_TASKS: dict[str, Generator] = {
    "add": varied(gen_add_wide), "sub": varied(gen_sub_wide),
    **{n: varied(g) for n, g in CHAT_TASKS.items() if n not in ("add", "sub")}, "help": gen_help,
}
# sampling weights of the stage-4 stream (add / sub over-weighted; everything else as in stage 3)
DEMO_WEIGHTS: dict[str, float] = {"add": 3.0, "sub": 2.0, **{n: 1.5 for n in PHRASING_TASKS}, "help": 3.0}
FAMILIES["demo"] = DEMO_TASKS
# The stage-6 variant (tried, not shipped: docs/DEMO_MODEL.md "Variants tried"): the same mixture plus add / sub
# questions that are always reworded (``add_rw``, ``sub_rw``), so that the reworded arithmetic can be over-weighted
# with ``--weights`` without over-weighting the canonical sums.
DEMO6_TASKS: dict[str, Generator] = {**DEMO_TASKS, "add_rw": varied(gen_add_wide, 1.0),
                                     "sub_rw": varied(gen_sub_wide, 1.0)}
FAMILIES["demo6"] = DEMO6_TASKS
WEIGHTS: dict[str, dict[str, float]] = {"demo": DEMO_WEIGHTS, "demo6": DEMO_WEIGHTS}


def _with_family(ex: Example, fam: str, rng: np.random.Generator, allowed: frozenset[str]) -> Example | None:
    """``ex`` reworded by ``fam`` and, in the other groups, random ``allowed`` families (None if ``fam`` does not apply)."""
    for _ in range(5):
        chosen = []
        for fams in WORDING_GROUPS.values():
            if fam in fams:
                chosen.append(fam)
                continue
            names = [f for f in fams if f in allowed and f != fam]
            group = next(g for g, v in WORDING_GROUPS.items() if v is fams)
            if names and rng.random() < _GROUP_RATE[group]:
                chosen.append(names[int(rng.integers(len(names)))])
        got = reword(ex, tuple(chosen), rng)
        if got is not None and got.user != ex.user:
            return got
    return None


def wording_eval_set(n: int, *, seen: bool, seed: int = 4321) -> list[Example]:
    """Held-out questions of the twelve chat families in other wordings (distinct user messages).

    Every wording family is measured in turn (round robin). ``seen``: the family comes with random other trained
    families; unseen: exactly one family that training never used (UNSEEN_WORDINGS) and nothing else. Either way
    the question itself is held out as in training (its canonical question, or for the arithmetic its item):
    only the wording is new or not."""
    rng = np.random.default_rng(seed)
    out: dict[str, Example] = {}
    fams = sorted(SEEN_WORDINGS if seen else UNSEEN_WORDINGS)
    names = list(CHAT_TASKS)
    j = tries = 0
    while len(out) < n:
        fam = fams[j % len(fams)]
        ex = CHAT_TASKS[names[int(rng.integers(len(names)))]](rng)
        got = _with_family(ex, fam, rng, SEEN_WORDINGS) if seen else reword(ex, (fam,), rng)
        tries += 1
        if tries > 20000:  # no new held-out question left for this family
            j, tries = j + 1, 0
        if got is None or got.user == ex.user or got.user in out or not in_eval_split(replace(got, wording="plain")):
            continue
        out[got.user] = got
        j, tries = j + 1, 0
    return list(out.values())


def help_eval_set(per_shape: int = 10, seed: int = 777) -> list[Example]:
    """``per_shape`` distinct held-out prompts of every help shape, the two never-trained shapes included.

    A shape with too few held-out prompts (``greeting`` and ``help``: short fixed lists, none of whose prompts the
    hash holds out) is filled up with its trained prompts in an unseen wording family (title case, a space before
    the end punctuation, double spaces), which training never saw either."""
    rng = np.random.default_rng(seed)
    out: list[Example] = []
    for shape in [*HELP_SHAPES, *UNSEEN_HELP_SHAPES]:
        got: dict[str, Example] = {}
        for attempt in range(6000):
            ex = help_example(shape, rng)
            if attempt >= 3000:  # fill up: a trained prompt in an unseen wording
                ex = reword(replace(ex, key=""), (sorted(UNSEEN_WORDINGS & _UNSEEN_SURFACE)[attempt % 3],), rng) or ex
                ex = replace(ex, key="help: " + re.sub(r"[\s?!.]+$", "", ex.user.lower()))
            if in_eval_split(ex):
                got.setdefault(ex.user, ex)
            if len(got) == per_shape:
                break
        out += got.values()
    return out


_UNSEEN_SURFACE = frozenset({"title", "space_punct", "double_space"})


# The lines of the issue that asked for this stage: what new users type first (answer or HELP_REPLY).
FIRST_MESSAGES: tuple[tuple[str, str], ...] = (
    ("hello", HELP_REPLY), ("Hi, who are you?", HELP_REPLY), ("What can you do?", HELP_REPLY),
    ("help", HELP_REPLY), ("Tell me a joke", HELP_REPLY), ("what's the capital of france", "Paris"),
    ("What is 3+4?", "7"), ("What is 12+7?", "19"), ("What is 25 + 9?", "34"), ("what is 25 + 9", "34"),
    ("3 plus 4", "7"), ("WHAT IS THE CAPITAL OF PERU?", "Lima"), ("sort 9 3 7 1", "1 3 7 9"),
)


@lru_cache(maxsize=1)
def _fact_questions() -> dict[str, bool]:
    """Every fact-table question -> held out? (fact i is held out in template i % len(templates) only)."""
    out: dict[str, bool] = {}
    for names, templates, article in (([n for n, _ in CAPITALS], CAPITAL_TEMPLATES, False),
                                      ([n for n, _ in COLOURS], COLOUR_TEMPLATES, True),
                                      (list(SPELL_WORDS), SPELL_TEMPLATES, False),
                                      (list(WORDS), ABOUT_THE_TEMPLATES, False),
                                      ([n for n, _ in COLOURS], ABOUT_THE_TEMPLATES, False),
                                      ([n for n, _ in CAPITALS], ABOUT_TEMPLATES, False),
                                      ([n for n, _ in PARITIES], NUMBER_TEMPLATES, False)):
        for i, name in enumerate(names):
            x = ("the " + name) if article else name
            for t, form in enumerate(templates):
                out[form.format(x=x)] = t == i % len(templates)
    return out


def _fact_heldout(user: str) -> bool | None:
    """Fact questions (capital, colour, spell): held out by template; None for other tasks."""
    return _fact_questions().get(user)


def in_eval_split(ex: Example) -> bool:
    """The held-out predicate for any example (facts by template, everything else by hash).

    A reworded question is split on its ``key`` (its canonical question or item), so every wording of a held-out
    question is held out; a question in an unseen wording family or of an unseen help shape is always held out."""
    if ex.wording != "plain" and set(ex.wording.split("+")) & UNSEEN_WORDINGS:
        return True
    if ex.task.startswith("help:") and ex.task[len("help:"):] in UNSEEN_HELP_SHAPES:
        return True
    user = ex.key or ex.user
    fact = _fact_heldout(user)
    return fact if fact is not None else is_heldout(user)


def _history(rng: np.random.Generator, families: dict[str, Generator]) -> tuple[tuple[str, str], ...]:
    """One or two earlier turns: training-split questions with their answers."""
    turns = [sample(rng, heldout=False, system_rate=0.0, families=families) for _ in range(int(rng.integers(1, 3)))]
    return tuple((t.user, t.answer) for t in turns)


def sample(rng: np.random.Generator, *, heldout: bool, system_rate: float = 0.2, extra_weight: float = 1.0,
           families: dict[str, Generator] = TASKS, history_rate: float = 0.0,
           weights: dict[str, float] | None = None) -> Example:
    """One example from the requested split (rejection sampling over the task mixture ``families``).

    Families are drawn uniformly; ``extra_weight`` != 1 weights the families beyond the eight short ones by that factor
    (training only; the evaluation set is always uniform). With probability ``history_rate`` the question comes
    after one or two earlier turns of the conversation (``_history``)."""
    names = list(families)
    p = None
    if weights is not None:  # explicit per-family weights (the ``demo`` mixture: WEIGHTS)
        w = np.array([weights.get(n, 1.0) for n in names])
        p = w / w.sum()
    elif extra_weight != 1.0:
        w = np.array([1.0 if n in TASKS else extra_weight for n in names])
        p = w / w.sum()
    while True:
        i = int(rng.integers(len(names))) if p is None else int(rng.choice(len(names), p=p))
        ex = families[names[i]](rng)
        if in_eval_split(ex) == heldout:
            break
    if rng.random() < system_rate:
        ex = replace(ex, system=SYSTEM_PROMPTS[int(rng.integers(len(SYSTEM_PROMPTS)))])
    if history_rate and rng.random() < history_rate:
        ex = replace(ex, history=_history(rng, families))
    return ex


def examples(seed: int, n: int, *, heldout: bool, families: dict[str, Generator] = TASKS) -> list[Example]:
    """``n`` examples of one split, deterministic for ``seed``."""
    rng = np.random.default_rng(seed)
    return [sample(rng, heldout=heldout, families=families) for _ in range(n)]


def eval_set(n: int = 200, seed: int = 1234, families: dict[str, Generator] = TASKS) -> list[Example]:
    """The held-out evaluation set: distinct user messages, deterministic."""
    rng = np.random.default_rng(seed)
    seen: dict[str, Example] = {}
    while len(seen) < n:
        ex = sample(rng, heldout=True, families=families)
        seen.setdefault(ex.user, ex)
    return list(seen.values())


def with_history(exs: list[Example], seed: int = 99, families: dict[str, Generator] = CHAT_TASKS) -> list[Example]:
    """The same questions asked as the next turn of a conversation (one or two training-split turns first)."""
    rng = np.random.default_rng(seed)
    return [replace(ex, history=_history(rng, families)) for ex in exs]


def stream(seed: int, extra_weight: float = 1.0, families: dict[str, Generator] = TASKS,
           history_rate: float = 0.0, weights: dict[str, float] | None = None) -> Iterator[Example]:
    """An endless training stream."""
    rng = np.random.default_rng(seed)
    while True:
        yield sample(rng, heldout=False, extra_weight=extra_weight, families=families, history_rate=history_rate,
                     weights=weights)


@lru_cache(maxsize=1)
def _template():
    return Environment(keep_trailing_newline=True).from_string(CHAT_TEMPLATE)


def render_prompt(ex: Example) -> str:
    """The chat-templated prompt, ending with the generation prompt ``<role>ASSISTANT</role>``."""
    return _template().render(messages=ex.messages(), add_generation_prompt=True)


def render_target(ex: Example) -> str:
    """What the model writes after the prompt: the answer and ``<|role_end|>`` (EOS padding is added in ids)."""
    return ex.answer + ROLE_END


def pad_to_block(n: int, block: int = BLOCK_LENGTH) -> int:
    """Padded sequence length: at least one ``<|endoftext|>`` after the answer, rounded up to a block."""
    return -(-(n + 1) // block) * block


def extract_answer(text: str) -> str:
    """The answer part of a generation: up to the first ``<|role_end|>`` / EOS, special tokens removed."""
    for stop in (ROLE_END, EOS):
        text = text.split(stop, 1)[0]
    return text.strip()


def check(ex: Example, generated: str) -> bool:
    """Exact match of the extracted answer (with any of the correct wordings of a phrasing question)."""
    got = extract_answer(generated)
    return got in ex.accept if ex.accept else got == ex.answer


__all__ = ["Example", "TASKS", "LONG_TASKS", "ALL_TASKS", "FAMILIES", "BLOCK_LENGTH", "examples", "eval_set", "stream", "sample", "in_eval_split",
           "is_heldout", "render_prompt", "render_target", "pad_to_block", "extract_answer", "check"]


def tokenizer_corpus(seed: int, n: int = 3000) -> list[str]:
    """Training-split chats with the special tokens cut out: the text the BPE merges are learned on."""
    import re
    from dllm_cli.demo.tokenizer import SPECIAL_TOKENS
    cut = re.compile("|".join(re.escape(t) for t in SPECIAL_TOKENS))
    out: list[str] = []
    for ex in examples(seed, n, heldout=False):
        out.extend(p for p in cut.split(render_prompt(ex) + render_target(ex)) if p)
    return out
