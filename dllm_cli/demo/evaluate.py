"""Torch-free evaluation of the demo model: a plain LLaDA2.1 joint M2T+T2T block decoder (spec §5.2).

The decoder recomputes the whole window ``[0, (k+1)B)`` every step (no KV cache), greedy, with the
``<|mask|>`` logit excluded from the argmax. ``logits_fn(ids [W]) -> logits [W, V]`` can be the numpy
reference (``RefModel.forward``) or, during training, the torch model. It exists so the demo model can be
scored before and independently of ``dllm_cli.decoding``.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from dllm_cli.demo import tasks
from dllm_cli.decoding.stepper import StepModel
from dllm_cli.demo.bpe import BPE

LogitsFn = Callable[[np.ndarray], np.ndarray]
MODES = {"quality": (0.7, 0.5), "speed": (0.5, 0.0)}


@dataclass(frozen=True)
class Decoded:
    tokens: list[int]  # generated ids, up to and including the first EOS
    forwards: int
    edits: int  # T2T replacements applied


def _softmax(x: np.ndarray) -> np.ndarray:
    z = np.exp(x - x.max(-1, keepdims=True))  # [B, V]
    return z / z.sum(-1, keepdims=True)  # [B, V]


def decode(logits_fn: LogitsFn, prompt: Sequence[int], *, mask_id: int, eos_id: int, threshold: float,
           editing_threshold: float, gen_length: int = 64, block: int = tasks.BLOCK_LENGTH,
           max_post_steps: int = 16) -> Decoded:
    """Spec §5.2 joint threshold decoding, one token minimum per step, editing inside the active block."""
    p_len = len(prompt)
    nb = -(-(p_len + gen_length) // block)
    x = np.full(nb * block, mask_id, dtype=np.int64)  # [T]
    x[:p_len] = prompt
    forwards = edits = 0
    for k in range(p_len // block, nb):
        s0, w = k * block, (k + 1) * block
        in_prompt = np.arange(s0, w) < p_len  # [B]
        post = 0
        while True:
            old = x[s0:w].copy()  # [B]
            act = old == mask_id  # [B]
            if not act.any():
                post += 1
            if post > max_post_steps:
                break
            logits = np.array(logits_fn(x[:w])[s0:w], dtype=np.float64)  # [B, V]
            forwards += 1
            logits[:, mask_id] = -np.inf
            probs = _softmax(logits)  # [B, V]
            x0 = probs.argmax(-1)  # [B]
            p = probs[np.arange(block), x0]  # [B]
            m2t = np.zeros(block, dtype=bool)
            if act.any():
                conf = np.where(act, p, -np.inf)  # [B]
                m2t = conf > threshold
                if not m2t.any():
                    m2t[int(np.argmax(conf))] = True
            t2t = ~act & ~in_prompt & (p > editing_threshold) & (x0 != old)  # [B]
            upd = m2t | t2t
            x[s0:w][upd] = x0[upd]
            edits += int(t2t.sum())
            if not act.any() and not t2t.any():
                break
        if (x[p_len:w] == eos_id).any():
            break
    out = x[p_len:p_len + gen_length].tolist()
    if eos_id in out:
        out = out[:out.index(eos_id) + 1]
    return Decoded(out, forwards, edits)


@dataclass(frozen=True)
class Score:
    mode: str
    accuracy: float
    tokens_per_forward: float
    edits_per_answer: float
    answers_with_edits: float  # share of answers where at least one T2T edit happened
    per_task: dict[str, float]
    tokens_per_s: float = 0.0  # generated tokens / decoding wall time (engine path only)
    per_task_tpf: dict[str, float] | None = None  # tokens per forward of each task family (engine path only)


def evaluate(logits_fn: LogitsFn, bpe: BPE, examples: Sequence[tasks.Example], mode: str,
             gen_length: int = 64) -> Score:
    """Exact-match accuracy, tokens per forward and edit statistics over ``examples``."""
    thr, edit = MODES[mode]
    mask_id, eos_id = bpe.token_id("<|mask|>"), bpe.token_id("<|endoftext|>")
    ok, toks, fwd, edits, edited = [], 0, 0, 0, 0
    by_task: dict[str, list[bool]] = {}
    for ex in examples:
        d = decode(logits_fn, bpe.encode(tasks.render_prompt(ex)), mask_id=mask_id, eos_id=eos_id,
                   threshold=thr, editing_threshold=edit, gen_length=gen_length)
        good = tasks.check(ex, bpe.decode(d.tokens))
        ok.append(good)
        by_task.setdefault(ex.task, []).append(good)
        toks, fwd, edits, edited = toks + len(d.tokens), fwd + d.forwards, edits + d.edits, edited + (d.edits > 0)
    n = max(len(ok), 1)
    return Score(mode, sum(ok) / n, toks / max(fwd, 1), edits / n, edited / n,
                 {t: sum(v) / len(v) for t, v in sorted(by_task.items())})


def format_score(s: Score) -> str:
    tpf = s.per_task_tpf or {}
    tasks_txt = " ".join(f"{t}={a:.2f}" + (f"/{tpf[t]:.2f}" if t in tpf else "") for t, a in s.per_task.items())
    speed = f" tok/s={s.tokens_per_s:.0f}" if s.tokens_per_s else ""
    return (f"{s.mode:8s} acc={s.accuracy:.3f} tpf={s.tokens_per_forward:.2f} edits/answer={s.edits_per_answer:.2f} "
            f"edited={s.answers_with_edits:.2f}{speed} | {'accuracy/tpf' if tpf else 'accuracy'}: {tasks_txt}")


__all__ = ["decode", "evaluate", "Decoded", "Score", "MODES", "format_score", "Answer", "answer_all", "score"]


@dataclass(frozen=True)
class Answer:
    """One decoded question: the example, the extracted answer and the decoding counts."""

    ex: tasks.Example
    text: str
    tokens: int
    forwards: int
    edits: int

    @property
    def ok(self) -> bool:
        return tasks.check(self.ex, self.text)

    @property
    def is_help(self) -> bool:
        return self.text == tasks.HELP_REPLY


def answer_all(step_model, bpe: BPE, examples: Sequence[tasks.Example], mode: str,
               max_tokens: int = 128) -> tuple[list[Answer], float]:
    """Decode ``examples`` through ``dllm_cli.decoding`` (KV-cached engine; stops at EOS or ``<|role_end|>``);
    returns the answers and the decoding wall time."""
    from dllm_cli.decoding import collect, generate, make_config

    thr, edit = MODES[mode]
    cfg = make_config(mode, "2.1", threshold=thr, editing_threshold=edit, max_post_steps=16, editing=True,
                      max_tokens=max_tokens, stop_ids=(bpe.token_id(tasks.ROLE_END),))
    out, secs = [], 0.0
    for ex in examples:
        step_model.rollback(0)
        ids = bpe.encode(tasks.render_prompt(ex))
        t0 = time.perf_counter()
        done = collect(generate(step_model, ids, cfg))
        secs += time.perf_counter() - t0
        out.append(Answer(ex, tasks.extract_answer(bpe.decode(list(done.ids))), len(done.ids), done.forwards, done.edits))
    return out, secs


def score(mode: str, answers: Sequence[Answer], secs: float = 0.0, group=lambda a: a.ex.task) -> Score:
    """Accuracy, TPF and edit figures of ``answers``, per group (default: per task family)."""
    n = max(len(answers), 1)
    by: dict[str, list[Answer]] = {}
    for a in answers:
        for g in ([group(a)] if isinstance(group(a), str) else group(a)):
            by.setdefault(g, []).append(a)
    toks, fwd = sum(a.tokens for a in answers), sum(a.forwards for a in answers)
    return Score(mode, sum(a.ok for a in answers) / n, toks / max(fwd, 1), sum(a.edits for a in answers) / n,
                 sum(a.edits > 0 for a in answers) / n, {t: sum(a.ok for a in v) / len(v) for t, v in sorted(by.items())},
                 toks / max(secs, 1e-9) if secs else 0.0,
                 {t: sum(a.tokens for a in v) / max(sum(a.forwards for a in v), 1) for t, v in sorted(by.items())})


def evaluate_engine(step_model, bpe: BPE, examples: Sequence[tasks.Example], mode: str,
                    max_tokens: int = 64) -> Score:
    """The same figures through ``dllm_cli.decoding`` (KV-cached engine; stops at EOS or ``<|role_end|>``).

    ``step_model`` is any ``StepModel``: ``ReferenceModel(load_gguf(path), ...)`` or the llama.cpp runtime.
    """
    answers, secs = answer_all(step_model, bpe, examples, mode, max_tokens)
    return score(mode, answers, secs)


def _wording_groups(a: Answer) -> list[str]:
    return a.ex.wording.split("+")


def arith_items(step: int = 1) -> list[tasks.Example]:
    """``What is a + b?`` for every a, b in 0-99 and ``What is a - b?`` for every a >= b (every ``step``-th pair)."""
    adds = [tasks.Example("add", f"What is {a} + {b}?", str(a + b)) for a in range(100) for b in range(100)]
    subs = [tasks.Example("sub", f"What is {a} - {b}?", str(a - b)) for a in range(100) for b in range(a + 1)]
    return adds[::step] + subs[::step]


def _arith_group(a: Answer) -> list[str]:
    x, y = (int(v) for v in re.findall(r"\d+", a.ex.user))
    digits = f"{len(str(x))}+{len(str(y))} digits" if a.ex.task == "add" else f"{len(str(x))}-{len(str(y))} digits"
    carry = (x % 10 + y % 10 >= 10) if a.ex.task == "add" else (x % 10 < y % 10)
    split = "held-out" if tasks.in_eval_split(a.ex) else "train-split"
    return [a.ex.task, f"{a.ex.task} {digits}", f"{a.ex.task} {'carry' if carry else 'no carry'}" if a.ex.task == "add"
            else f"{a.ex.task} {'borrow' if carry else 'no borrow'}", f"{a.ex.task} {split}"]


def format_groups(title: str, s: Score) -> str:
    tpf = s.per_task_tpf or {}
    return (f"{s.mode:8s} {title}: acc={s.accuracy:.3f} tpf={s.tokens_per_forward:.2f} edited={s.answers_with_edits:.2f}\n"
            + "\n".join(f"  {g:28s} {a * 100:5.1f} %  tpf {tpf.get(g, 0):.2f}" for g, a in s.per_task.items()))


def help_table(mode: str, answers: Sequence[Answer]) -> str:
    """Per help shape: how often the reply is the help answer, something else starting like it, or another answer."""
    by: dict[str, list[Answer]] = {}
    for a in answers:
        by.setdefault(a.ex.task.split(":", 1)[1], []).append(a)
    rows = []
    for shape, v in by.items():
        other = [a.text for a in v if not a.is_help]
        seen = "seen" if shape in tasks.HELP_SHAPES else "UNSEEN"
        rows.append(f"  {shape:14s} {seen:6s} help {sum(a.is_help for a in v):3d}/{len(v):<3d} "
                    f"other: {other[:3]!r}")
    n = len(answers)
    return (f"{mode:8s} help prompts: help answer {sum(a.is_help for a in answers)}/{n} "
            f"({sum(a.is_help for a in answers) / max(n, 1) * 100:.1f} %), tpf "
            f"{sum(a.tokens for a in answers) / max(sum(a.forwards for a in answers), 1):.2f}\n" + "\n".join(rows))


def main(argv: list[str] | None = None) -> None:
    """``python -m dllm_cli.demo.evaluate GGUF [N] [--runtime] [--history] [--families F] [--suite S] [--mode M]``: score a demo GGUF.

    Through the numpy reference by default; ``--runtime`` uses the patched llama.cpp session instead
    (one thread: more threads only add synchronisation on a model this small).
    """
    import argparse
    from pathlib import Path

    from dllm_cli.errors import DllmError

    ap = argparse.ArgumentParser(prog="python -m dllm_cli.demo.evaluate",
                                 description="Score a demo-model GGUF on the held-out set, in quality and speed mode.")
    ap.add_argument("gguf", type=Path)
    ap.add_argument("n", type=int, nargs="?", default=200, help="held-out questions (default 200)")
    ap.add_argument("--runtime", action="store_true", help="decode on the patched llama.cpp runtime")
    ap.add_argument("--history", action="store_true", help="ask each question after one or two earlier turns")
    ap.add_argument("--families", choices=sorted(tasks.FAMILIES), default="chat", help="task mixture (default: chat)")
    ap.add_argument("--mode", choices=("both", *MODES), default="both", help="decode in both modes (default) or one")
    ap.add_argument("--suite", choices=SUITES, default="chat",
                    help="chat: N held-out questions of --families (default); wordings: N held-out questions in seen "
                         "and N in unseen wordings, per wording family; help: N prompts per help shape; arith: every "
                         "N-th sum / difference over the whole operand range; first: the first messages of new users")
    a = ap.parse_args(argv)
    if not a.gguf.is_file():
        ap.error(f"{a.gguf} is not a file")
    if a.n < 1:
        ap.error(f"N must be at least 1, got {a.n}")
    path, families = str(a.gguf), tasks.FAMILIES[a.families]
    model: StepModel
    try:
        bpe = BPE(_merges_from_gguf(path))
        if a.runtime:
            from dllm_cli.generate import load
            from dllm_cli.runtime.options import RuntimeOptions

            model = load(path, RuntimeOptions(threads=1)).session  # one thread: fastest for a 1.8 M model
        else:
            from dllm_cli.decoding import ReferenceModel
            from dllm_cli.reference import load_gguf

            model = ReferenceModel(load_gguf(path, np.float32), eos_id=bpe.token_id(tasks.EOS),
                                   mask_id=bpe.token_id("<|mask|>"))
    except (DllmError, OSError, ValueError, KeyError) as e:
        raise SystemExit(f"error: {path} is not a demo-model GGUF ({e}); pass the GGUF that train.py --gguf wrote")
    modes = list(MODES) if a.mode == "both" else [a.mode]
    if a.suite == "chat":
        examples = tasks.eval_set(a.n, families=families)
        if a.history:  # the same questions as the next turn of a conversation
            examples = tasks.with_history(examples, families=families)
        for mode in modes:
            print(format_score(evaluate_engine(model, bpe, examples, mode)), flush=True)
        return
    for mode in modes:
        if a.suite == "wordings":
            for seen in (True, False):
                exs = tasks.wording_eval_set(a.n, seen=seen)
                if a.history:
                    exs = tasks.with_history(exs)
                answers, secs = answer_all(model, bpe, exs, mode)
                name = "seen wordings" if seen else "UNSEEN wordings"
                print(format_groups(name + " by task", score(mode, answers, secs)), flush=True)
                print(format_groups(name + " by wording family", score(mode, answers, secs, _wording_groups)), flush=True)
                print(f"{mode:8s} {name}: help answer given to {sum(x.is_help for x in answers)} of {len(answers)}", flush=True)
        elif a.suite == "help":
            exs = tasks.help_eval_set(a.n)
            if a.history:
                exs = tasks.with_history(exs)
            answers, _ = answer_all(model, bpe, exs, mode)
            print(help_table(mode, answers), flush=True)
        elif a.suite == "arith":
            answers, secs = answer_all(model, bpe, arith_items(a.n), mode)
            print(format_groups("arithmetic over the whole range", score(mode, answers, secs, _arith_group)), flush=True)
        else:  # first
            exs = [tasks.Example("first", u, ans) for u, ans in tasks.FIRST_MESSAGES]
            answers, _ = answer_all(model, bpe, exs, mode)
            for x in answers:
                verdict = "help" if x.is_help else "RIGHT" if x.ok else "WRONG"
                print(f"{mode:8s} {verdict:5s} {x.ex.user!r} -> {x.text!r}", flush=True)


SUITES = ("chat", "wordings", "help", "arith", "first")


def _merges_from_gguf(path: str) -> list[tuple[str, str]]:
    from gguf import GGUFReader

    field = GGUFReader(path).fields["tokenizer.ggml.merges"]
    return [tuple(m.split(" ", 1)) for m in field.contents()]


if __name__ == "__main__":
    main()
