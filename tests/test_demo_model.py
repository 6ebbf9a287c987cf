"""The shipped demo model (``dllm_cli/demo/demo.gguf``) on the real patched llama.cpp runtime.

A fixed subset of the held-out evaluation set (the first 12 questions of ``tasks.eval_set(200)``, all eight
task families of the shipped model), quality mode (threshold 0.7, editing threshold 0.5), greedy and therefore
deterministic: a few answers are pinned exactly and the subset accuracy must stay at the level measured
for the shipped model (docs/DEMO_MODEL.md). One runtime thread; well under a minute on 2 cores.
"""
from __future__ import annotations

import pytest

from dllm_cli.demo import tasks
from dllm_cli.generate import decode_config, generate, load, prompt_ids
from dllm_cli.registry import embedded_model_path
from dllm_cli.runtime.options import RuntimeOptions

# question -> exact answer the shipped model gives (all correct); short and long families
PINNED = {
    "Copy this: coat coat ship": "coat coat ship",
    "What is 94 minus 85?": "9",
    "Reverse: t m a c": "c a m t",
    "What is the capital of Japan?": "Tokyo",
    "Sort: 6 6 2 9 8": "2 6 6 8 9",
    "Which city is the capital of Chile?": "Santiago",
}
MIN_CORRECT = 10  # of 12: the shipped model misses the two additions (55 + 69 -> 123, 46 + 9 -> 54)


def subset() -> list[tasks.Example]:
    return tasks.eval_set(200)[:12]


@pytest.fixture(scope="module")
def answers() -> dict[str, tuple[tasks.Example, str, int]]:
    loaded = load(str(embedded_model_path()), RuntimeOptions(threads=1))
    try:
        config = decode_config(loaded.model, "quality", threshold=0.7, editing_threshold=0.5, editing=True,
                               max_post_steps=16, max_tokens=64)
        out = {}
        for ex in subset():
            loaded.session.rollback(0)
            done = generate(loaded, prompt_ids(loaded.model, ex.messages()), config)
            text = loaded.model.detokenize(list(done.ids), skip_special=False)
            out[ex.user] = (ex, tasks.extract_answer(text), done.forwards)
        return out
    finally:
        loaded.close()


def test_subset_covers_every_family_and_is_held_out():
    sub = subset()
    assert {e.task for e in sub} == set(tasks.TASKS)
    assert all(tasks.in_eval_split(e) for e in sub)
    assert set(PINNED) <= {e.user for e in sub}


@pytest.mark.parametrize("user", sorted(PINNED))
def test_pinned_answers_are_exact(answers, user):
    ex, got, _ = answers[user]
    assert got == PINNED[user] == ex.answer


def test_subset_accuracy(answers):
    wrong = {u: (ex.answer, got) for u, (ex, got, _) in answers.items() if got != ex.answer}
    assert len(answers) - len(wrong) >= MIN_CORRECT, wrong
