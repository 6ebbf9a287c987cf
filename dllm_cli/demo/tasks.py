"""Synthetic chat tasks for the embedded demo model: seeded generators, a held-out split, exact checking.

Every task has a short answer that can be checked exactly. The split is a pure function of the user
message (``is_heldout``), so training and evaluation examples never share a question, whatever the seed.
Fact questions generalise over phrasing: each fact keeps one question template for evaluation only.
"""
from __future__ import annotations

import hashlib
import itertools
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
    """The held-out predicate for any example (facts by template, everything else by hash)."""
    fact = _fact_heldout(ex.user)
    return fact if fact is not None else is_heldout(ex.user)


def _history(rng: np.random.Generator, families: dict[str, Generator]) -> tuple[tuple[str, str], ...]:
    """One or two earlier turns: training-split questions with their answers."""
    turns = [sample(rng, heldout=False, system_rate=0.0, families=families) for _ in range(int(rng.integers(1, 3)))]
    return tuple((t.user, t.answer) for t in turns)


def sample(rng: np.random.Generator, *, heldout: bool, system_rate: float = 0.2, extra_weight: float = 1.0,
           families: dict[str, Generator] = TASKS, history_rate: float = 0.0) -> Example:
    """One example from the requested split (rejection sampling over the task mixture ``families``).

    Families are drawn uniformly; ``extra_weight`` != 1 weights the families beyond the eight short ones by that factor
    (training only; the evaluation set is always uniform). With probability ``history_rate`` the question comes
    after one or two earlier turns of the conversation (``_history``)."""
    names = list(families)
    p = None
    if extra_weight != 1.0:
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
           history_rate: float = 0.0) -> Iterator[Example]:
    """An endless training stream."""
    rng = np.random.default_rng(seed)
    while True:
        yield sample(rng, heldout=False, extra_weight=extra_weight, families=families, history_rate=history_rate)


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
