"""The shipped demo model (``dllm_cli/demo/demo.gguf``) on the real patched llama.cpp runtime.

A fixed subset of the held-out evaluation set (the first two questions of each of the twelve task families in
``tasks.eval_set(200, families=tasks.CHAT_TASKS)``), decoded greedily in quality mode (0.7 / 0.5) and speed mode
(0.5 / 0.0), so everything is deterministic: a few answers are pinned exactly, the subset accuracy must stay at
the level measured for the shipped model (also with one or two earlier turns in the conversation), and speed mode
must keep its advantage on the open questions (docs/DEMO_MODEL.md). One runtime thread; a few seconds on 2 cores.
"""
from __future__ import annotations

import pytest

from dllm_cli.demo import tasks
from dllm_cli.generate import decode_config, generate, load, prompt_ids
from dllm_cli.registry import embedded_model_path
from dllm_cli.runtime.options import RuntimeOptions

MODES = {"quality": (0.7, 0.5), "speed": (0.5, 0.0)}
# question -> exact answer the shipped model gives in quality mode (all correct)
PINNED = {
    "Copy this: book ship book rose": "book ship book rose",
    "What is 93 minus 76?": "17",
    "Reverse: 8 9 5 8 2 9": "9 2 8 5 9 8",
    "Which city is the capital of Germany?": "Berlin",
    "What colour is the coal?": "black",
    "Describe Peru.": "Well, the capital of Peru is Lima. It is a very nice city.",
    "What do you think of the cloud?": "The cloud is white. It is a very nice colour.",
    "What do you think of the number 41?": "Well, 41 is an odd number. It is a very nice number.",
}
# of 24 in quality mode, asked alone and as the next turn of a conversation: the shipped model answers all 24 both ways
# (one less allowed for float differences between CPUs; over all sums in 0-99 it is not perfect: docs/DEMO_MODEL.md)
MIN_CORRECT = 23
# unseen / seen wording samples answered right (of 14 / 12) and help prompts answered with the help answer (of 14):
# the shipped model answers 8, 12 and 13 (one less allowed for float differences between CPUs; docs/DEMO_MODEL.md)
MIN_UNSEEN = 7
MIN_SEEN = 11
MIN_HELP = 12


def subset() -> list[tasks.Example]:
    held = tasks.eval_set(200, families=tasks.CHAT_TASKS)
    return [e for family in tasks.CHAT_TASKS for e in [e for e in held if e.task == family][:2]]


def first_messages() -> list[tasks.Example]:
    """The first messages of new users that asked for the retrained model (right answer or the help answer)."""
    return [tasks.Example("first", u, a) for u, a in tasks.FIRST_MESSAGES]


def unseen_wordings() -> list[tasks.Example]:
    """Two held-out questions in each wording family that training never used (title case, ``How much is``, ...)."""
    return tasks.wording_eval_set(2 * len(tasks.UNSEEN_WORDINGS), seen=False)


def seen_wordings() -> list[tasks.Example]:
    """Held-out questions in trained wording families (one per family, with random others)."""
    return tasks.wording_eval_set(len(tasks.SEEN_WORDINGS), seen=True)


def help_prompts() -> list[tasks.Example]:
    """One held-out prompt of every help shape (greetings, jokes, code, other languages, gibberish, ...)."""
    return tasks.help_eval_set(1)


RUNS = {
    "quality": subset, "speed": subset, "quality-history": lambda: tasks.with_history(subset()),
    "quality-first": first_messages, "speed-first": first_messages, "quality-unseen": unseen_wordings,
    "quality-seen": seen_wordings, "quality-help": help_prompts, "speed-help": help_prompts,
}


@pytest.fixture(scope="module")
def runs() -> dict[str, dict[str, tuple[tasks.Example, str, int, int, int]]]:
    """run -> question -> (example, answer, generated tokens, forwards, edits); runs: quality, speed, and
    quality-history (the same questions after one or two earlier turns); the first messages of new users, wording
    variants and help prompts."""
    loaded = load(str(embedded_model_path()), RuntimeOptions(threads=1))
    try:
        out: dict[str, dict[str, tuple[tasks.Example, str, int, int, int]]] = {}
        for run, make in RUNS.items():
            exs = make()
            mode = run.split("-")[0]
            threshold, editing_threshold = MODES[mode]
            config = decode_config(loaded.model, mode, threshold=threshold, editing_threshold=editing_threshold,
                                   editing=True, max_post_steps=16, max_tokens=64 if run in ("quality", "speed", "quality-history") else 128)
            out[run] = {}
            for ex in exs:
                loaded.session.rollback(0)
                done = generate(loaded, prompt_ids(loaded.model, ex.messages()), config)
                text = loaded.model.detokenize(list(done.ids), skip_special=False)
                out[run][ex.user] = (ex, tasks.extract_answer(text), len(done.ids), done.forwards, done.edits)
        return out
    finally:
        loaded.close()


def test_subset_covers_every_family_and_is_held_out():
    sub = subset()
    assert len(sub) == 24 and {e.task for e in sub} == set(tasks.CHAT_TASKS)
    assert all(tasks.in_eval_split(e) for e in sub)
    assert set(PINNED) <= {e.user for e in sub}


@pytest.mark.parametrize("user", sorted(PINNED))
def test_pinned_answers_are_exact(runs, user):
    ex, got, *_ = runs["quality"][user]
    assert got == PINNED[user] and tasks.check(ex, got)


@pytest.mark.parametrize("run", ["quality", "quality-history"])
def test_subset_accuracy(runs, run):
    if run == "quality-history":
        assert all(ex.history for ex, *_ in runs[run].values())
    wrong = {u: (ex.answer, got) for u, (ex, got, *_) in runs[run].items() if not tasks.check(ex, got)}
    assert len(runs[run]) - len(wrong) >= MIN_CORRECT, wrong


def test_speed_mode_is_faster_and_edits_on_open_questions(runs):
    """On the open (free-wording) questions quality mode commits one word choice per forward, speed mode
    commits them together and repairs mixed words with T2T edits. Shipped model on these eight: 69 forwards in
    quality mode, 31 in speed mode with 7 edits (held-out figures: docs/DEMO_MODEL.md)."""
    def totals(mode: str) -> tuple[int, int, int, int]:
        rows = [r for r in runs[mode].values() if r[0].task in tasks.PHRASING_TASKS]
        return (sum(r[2] for r in rows), sum(r[3] for r in rows), sum(r[4] for r in rows),
                sum(tasks.check(r[0], r[1]) for r in rows))
    q_tokens, q_forwards, _, q_ok = totals("quality")
    s_tokens, s_forwards, s_edits, s_ok = totals("speed")
    assert q_ok == 8 and s_ok >= 7
    assert (s_tokens / s_forwards) >= 2.0 * (q_tokens / q_forwards), (s_tokens, s_forwards, q_tokens, q_forwards)
    assert s_edits >= 1


@pytest.mark.parametrize("extra", [[], ["--history"]])
def test_evaluation_script_prints_both_modes(capsys, extra):
    """``python -m dllm_cli.demo.evaluate GGUF N --runtime [--history]``: the command behind the recorded table."""
    from dllm_cli.demo.evaluate import main

    main([str(embedded_model_path()), "12", "--runtime", *extra])
    lines = capsys.readouterr().out.splitlines()
    assert [ln.split()[0] for ln in lines] == ["quality", "speed"]
    for ln in lines:
        fields = dict(f.split("=", 1) for f in ln.split("|")[0].split()[1:])
        assert 0.75 <= float(fields["acc"]) <= 1 and float(fields["tpf"]) > 1, ln
        assert "accuracy/tpf:" in ln


def test_evaluation_script_rejects_bad_input_with_one_line(tmp_path, capsys):
    from dllm_cli.demo.evaluate import main

    with pytest.raises(SystemExit) as missing:
        main([str(tmp_path / "nope.gguf")])
    assert missing.value.code == 2 and "is not a file" in capsys.readouterr().err
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf")
    with pytest.raises(SystemExit) as corrupt:
        main([str(bad), "3", "--runtime"])
    assert str(corrupt.value.code).startswith("error: ") and "\n" not in str(corrupt.value.code)


HELP_LINES = ("hello", "Hi, who are you?", "What can you do?", "help", "Tell me a joke")


@pytest.mark.parametrize("mode,user", [(m, u) for m in ("quality", "speed") for u, _ in tasks.FIRST_MESSAGES])
def test_first_messages_get_the_answer_or_the_help_answer(runs, mode, user):
    """Each line of the issue that asked for this model: the right answer or the help answer (never a made-up fact
    or number); greetings, "who are you", "what can you do", "help" and a joke request get the help answer."""
    want = dict(tasks.FIRST_MESSAGES)[user]
    got = runs[f"{mode}-first"][user][1]
    assert got in (want, tasks.HELP_REPLY), got
    if user in HELP_LINES:
        assert got == tasks.HELP_REPLY


@pytest.mark.parametrize("run,minimum", [("quality-unseen", "MIN_UNSEEN"), ("quality-seen", "MIN_SEEN")])
def test_wordings(runs, run, minimum):
    """Held-out questions reworded by families training never used, and by trained ones (docs/DEMO_MODEL.md has
    the full figures)."""
    rows = runs[run].values()
    wrong = {u: (ex.answer, got) for u, (ex, got, *_) in runs[run].items() if not tasks.check(ex, got)}
    assert len(rows) - len(wrong) >= globals()[minimum], wrong


@pytest.mark.parametrize("mode", ["quality", "speed"])
def test_out_of_scope_prompts_get_the_help_answer(runs, mode):
    rows = runs[f"{mode}-help"]
    assert len(rows) == len(tasks.HELP_SHAPES) + len(tasks.UNSEEN_HELP_SHAPES)
    other = {u: got for u, (_, got, *_) in rows.items() if got != tasks.HELP_REPLY}
    assert len(rows) - len(other) >= MIN_HELP, other


def test_speed_mode_is_faster_overall(runs):
    """Tokens per forward over the 24 questions and the help prompts: speed mode above quality mode."""
    def tpf(*names: str) -> float:
        rows = [r for n in names for r in runs[n].values()]
        return sum(r[2] for r in rows) / sum(r[3] for r in rows)
    assert tpf("speed", "speed-help") > tpf("quality", "quality-help")
