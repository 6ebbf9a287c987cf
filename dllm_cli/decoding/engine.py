"""The block loop of block-diffusion decoding (spec §5.0, §5.3, §5.6, §3.11): a generator of typed events, no I/O.

Canvas: ``P`` prompt tokens, then masks, ``ceil((P + max_tokens) / B)`` blocks of ``B`` aligned at position 0.
Generation starts at block ``floor(P / B)``, whose head is the prompt tail (never written). Full prompt blocks are
committed once (reusing the longest block-aligned prefix already in the model's cache); each active block is
refined with ``model.step`` until the policy ends it, then committed with one ``model.commit`` before the next.
Only finalized blocks are checked for stop ids and emitted.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from dllm_cli.decoding.config import DecodeConfig
from dllm_cli.decoding.editing import make_policy
from dllm_cli.decoding.events import BlockEvent, DoneEvent, Event, StartEvent, StepEvent
from dllm_cli.decoding.mbe import Window
from dllm_cli.decoding.sampling import Sampler, make_sampler
from dllm_cli.decoding.stepper import StepModel
from dllm_cli.decoding.threshold import Policy
from dllm_cli.errors import ContextFullError, DecodeError, UsageError

Detokenize = Callable[[list[int]], str]


@dataclass
class _Run:
    """Mutable state of one generation shared by the block loop and the step loop."""

    model: StepModel
    canvas: np.ndarray  # [n_blocks * B] int64
    P: int
    B: int
    policy: Policy
    sampler: Sampler
    rng: np.random.Generator
    t0: float
    forwards: int = 0
    commits: int = 0
    steps: int = 0
    edits: int = 0

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0


def generate(model: StepModel, prompt_ids: Sequence[int], config: DecodeConfig, *,
             rng: np.random.Generator | None = None, detokenize: Detokenize | None = None) -> Iterator[Event]:
    """Decode a continuation of ``prompt_ids``; the iterator yields Start, Step*, Block*, then one ``DoneEvent``.

    Checked eagerly, before any decode: ``ContextFullError`` when the canvas does not fit ``model.n_ctx``,
    ``UsageError`` when ``config.block_length`` disagrees with the model's.
    """
    t0 = time.perf_counter()
    B = _block_length(model, config)
    prompt = [int(t) for t in prompt_ids]
    P = len(prompt)
    n_blocks = math.ceil((P + config.max_tokens) / B)
    if n_blocks * B > model.n_ctx:
        raise ContextFullError(
            f"prompt ({P} tokens) + --max-tokens {config.max_tokens} need {n_blocks * B} positions "
            f"(whole blocks of {B}) but the context holds {model.n_ctx}",
            "raise --ctx-size or lower --max-tokens / shorten the prompt")
    canvas = np.full(n_blocks * B, model.mask_id, dtype=np.int64)  # [T]
    canvas[:P] = prompt
    run = _Run(model, canvas, P, B, make_policy(config, B),
               make_sampler(temperature=config.temperature, top_k=config.top_k, top_p=config.top_p),
               rng if rng is not None else np.random.default_rng(config.seed), t0)
    return _events(run, prompt, n_blocks, config, detokenize)


def _events(run: _Run, prompt: list[int], n_blocks: int, config: DecodeConfig,
            detokenize: Detokenize | None) -> Iterator[Event]:
    model, canvas, P, B = run.model, run.canvas, run.P, run.B
    k0 = P // B
    reused = _reuse_prefix(run, prompt, k0 * B)
    yield StartEvent(P, reused, B, model.mask_id, k0, n_blocks, config.to_dict())
    stops = {int(model.eos_id), *config.stop_ids}
    window = Window(first=k0, size=config.mbe)
    text = _TextStream(detokenize)
    ids: list[int] = []
    emitted, finish = 0, "length"
    for k in range(k0, n_blocks):
        yield from _decode_block(run, k, window.start(k) * B)
        ids, hit = _output(canvas, P, (k + 1) * B, config.max_tokens, stops)
        stop = hit or k == n_blocks - 1
        finish = "eos" if hit else "length"
        for j in window.finalize(k, stop):
            ids_j, _ = _output(canvas, P, (j + 1) * B, config.max_tokens, stops)
            chunk = text.update(ids_j, final=stop and j == k)
            yield BlockEvent(j, tuple(ids_j[emitted:]), chunk, run.forwards, run.elapsed())
            emitted = len(ids_j)
            if not stop:
                model.commit(canvas[j * B:(j + 1) * B].tolist(), j * B)
                run.commits += 1
        if stop:
            break
    yield DoneEvent(tuple(ids), detokenize(list(ids)) if detokenize else "", P, finish, run.forwards,
                    run.commits, run.steps, run.edits, len(ids) / run.forwards if run.forwards else 0.0,
                    run.elapsed(), reused)


def collect(events: Iterable[Event]) -> DoneEvent:
    """Drain ``events`` and return the final ``DoneEvent`` (the ``GenerationResult``)."""
    done = None
    for ev in events:
        if isinstance(ev, DoneEvent):
            done = ev
    if done is None:
        raise DecodeError("generation ended without a result")
    return done


def _block_length(model: StepModel, config: DecodeConfig) -> int:
    B = int(model.block_length)
    if config.block_length is not None and config.block_length != B:
        raise UsageError(f"--block-length {config.block_length} differs from the model context's block length {B}",
                         "omit --block-length or load the model with the same block length")
    return B


def _reuse_prefix(run: _Run, prompt: list[int], limit: int) -> int:
    """Keep the longest block-aligned cached prefix agreeing with the prompt (<= ``limit``); commit the rest."""
    cached = run.model.cached
    n = 0
    while n < min(len(cached), limit) and cached[n] == prompt[n]:
        n += 1
    keep = n // run.B * run.B
    if len(cached) > keep:
        run.model.rollback(keep)
    if limit > keep:
        run.model.commit(prompt[keep:limit], keep)  # one block-causal decode for all remaining prompt blocks
        run.commits += 1
    return keep


def _decode_block(run: _Run, k: int, ws: int) -> Iterator[StepEvent]:
    """Refine block ``k`` (forwarding the window ``[ws, (k+1)B)``) until the policy ends it."""
    model, mask_id, s0, we = run.model, run.model.mask_id, k * run.B, (k + 1) * run.B
    pos = np.arange(ws, we)  # [L] absolute positions of the window
    prompt, in_block = pos < run.P, pos >= s0  # [L], [L]
    extra = {"attn_block": 0} if ws < s0 else {}
    run.policy.begin_block()
    cap = 2 * run.B + getattr(run.policy, "max_post_steps", 0) + 1
    for step in range(cap):
        old = run.canvas[ws:we].copy()  # [L]
        is_mask = old == mask_id  # [L]
        act = is_mask & in_block  # [L] M2T candidates: masks of the active block only
        if not run.policy.proceed(int(act.sum())):
            return
        rows = np.flatnonzero(~prompt if run.policy.edits else act)  # [n]
        out = model.step(old.tolist(), ws, rows.tolist(), want_logits=run.sampler.needs_logits, **extra)
        run.forwards += 1
        ids, probs = run.sampler(out, run.rng, mask_id)  # [n], [n]
        x0, p = old.copy(), np.zeros(len(old))  # [L], [L]
        x0[rows], p[rows] = ids, probs
        p[x0 == mask_id] = -np.inf  # the mask token is never written
        m2t, t2t = run.policy.select(x0, p, act, ~is_mask & ~prompt, old)
        m2t, t2t = m2t & act, t2t & ~is_mask & ~prompt
        run.canvas[ws:we] = np.where(m2t | t2t, x0, old)
        un, ed = np.flatnonzero(m2t), np.flatnonzero(t2t)
        run.steps += 1
        run.edits += len(ed)
        yield StepEvent(k, step, ws, tuple(run.canvas[ws:we].tolist()), tuple(un.tolist()),
                        tuple((int(i), int(old[i]), int(x0[i])) for i in ed),
                        tuple(float(p[i]) for i in (*un, *ed)), run.forwards, run.commits,
                        int((run.canvas[s0:we] == mask_id).sum()), run.elapsed())
        if run.policy.block_done(bool(act.any()), bool(len(ed))):
            return
    raise DecodeError(f"block {k} did not converge in {cap} steps (the model keeps predicting the mask token)",
                      "check the model's mask token id")


def _output(canvas: np.ndarray, P: int, upto: int, max_tokens: int, stops: set[int]) -> tuple[list[int], bool]:
    """Generated ids in ``[P, min(upto, P + max_tokens))`` cut after the first stop id; and whether one was hit."""
    ids = canvas[P:min(upto, P + max_tokens)].tolist()
    for i, t in enumerate(ids):
        if t in stops:
            return ids[:i + 1], True
    return ids, False


class _TextStream:
    """Newly final text: detokenize the cumulative ids, emit the new suffix, hold back a trailing U+FFFD."""

    def __init__(self, detokenize: Detokenize | None) -> None:
        self.detokenize = detokenize
        self.emitted = ""

    def update(self, ids: list[int], final: bool) -> str:
        if self.detokenize is None:
            return ""
        text = self.detokenize(list(ids))
        if not final:
            text = text.rstrip("\ufffd")  # an incomplete UTF-8 sequence: wait for the next block
        new = text[len(self.emitted):]
        self.emitted = text if len(text) > len(self.emitted) else self.emitted
        return new
