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
from functools import partial
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from dllm_cli.decoding.config import DecodeConfig
from dllm_cli.decoding.editing import make_policy
from dllm_cli.decoding.events import BlockEvent, DoneEvent, Event, StartEvent, StepEvent
from dllm_cli.decoding.guided import Constraint, Guide
from dllm_cli.decoding.guided_indel import EditGuide
from dllm_cli.decoding.levenshtein import LevenshteinPolicy, Scrub, Settle
from dllm_cli.decoding.mbe import Window
from dllm_cli.decoding.sampling import Sampler, filtered_probs, make_sampler
from dllm_cli.decoding.stepper import StepModel, StepOutput, WantLogits, top2_from_logits
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
    policy: Policy | LevenshteinPolicy
    sampler: Sampler
    rng: np.random.Generator
    t0: float
    forwards: int = 0
    commits: int = 0
    steps: int = 0
    edits: int = 0
    inserts: int = 0
    deletes: int = 0
    guide: Guide | None = None
    edit_guide: EditGuide | None = None  # LLaDA2.2 under a constraint

    @property
    def want_logits(self) -> WantLogits:
        """"view" when sampling or a constraint reads the step's logits: both read them before the next decode
        and never write them, so the runtime lends its own buffer instead of copying ``[n, V]`` floats."""
        return "view" if self.sampler.needs_logits or self.guide is not None else False

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0


def generate(model: StepModel, prompt_ids: Sequence[int], config: DecodeConfig, *,
             rng: np.random.Generator | None = None, detokenize: Detokenize | None = None,
             constraint: Constraint | None = None) -> Iterator[Event]:
    """Decode a continuation of ``prompt_ids``; the iterator yields Start, Step*, Block*, then one ``DoneEvent``.

    With ``constraint`` every step predicts from the allowed tokens only and every write keeps the answer
    completable (``guided``), in every policy, LLaDA2.2's inserts and deletes included (``guided_indel``: each
    write re-checked after the shifts of the step's more confident ones); the model is then asked for the logits
    of its rows.

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
    policy = make_policy(config, B, mask_id=model.mask_id, edit_ids=getattr(model, "edit_ids", None))
    run = _Run(model, canvas, P, B, policy,
               make_sampler(temperature=config.temperature, top_k=config.top_k, top_p=config.top_p),
               rng if rng is not None else np.random.default_rng(config.seed), t0)
    if constraint is not None:
        run.guide = Guide(constraint, mask_id=model.mask_id, P=P, max_tokens=config.max_tokens, sampler=run.sampler,
                          rng=run.rng)
        if isinstance(policy, LevenshteinPolicy):
            run.edit_guide = EditGuide(run.guide, delete_id=policy.delete_id, split_id=policy.split_id,
                                       indel=policy.indel)
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
        if isinstance(run.policy, LevenshteinPolicy):
            yield from _decode_block_indel(run, run.policy, k)
        else:
            yield from _decode_block(run, run.policy, k, window.start(k) * B)
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
                    run.elapsed(), reused, run.inserts, run.deletes)


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


def _decode_block(run: _Run, policy: Policy, k: int, ws: int) -> Iterator[StepEvent]:
    """Refine block ``k`` (forwarding the window ``[ws, (k+1)B)``) until the policy ends it."""
    model, mask_id, s0, we = run.model, run.model.mask_id, k * run.B, (k + 1) * run.B
    pos = np.arange(ws, we)  # [L] absolute positions of the window
    prompt, in_block = pos < run.P, pos >= s0  # [L], [L]
    extra = {"attn_block": 0} if ws < s0 else {}
    policy.begin_block()
    cap = 2 * run.B + getattr(policy, "max_post_steps", 0) + 1
    for step in range(cap):
        old = run.canvas[ws:we].copy()  # [L]
        is_mask = old == mask_id  # [L]
        act = is_mask & in_block  # [L] M2T candidates: masks of the active block only
        if not policy.proceed(int(act.sum())):
            return
        rows = np.flatnonzero(~prompt if policy.edits else act)  # [n]
        out = model.step(old.tolist(), ws, rows.tolist(), want_logits=run.want_logits, **extra)
        run.forwards += 1
        if run.guide is None:
            ids, probs = run.sampler(out, run.rng, mask_id)  # [n], [n]
        else:
            ids, probs = run.guide.predict(run.canvas, ws, we, rows, _with_logits(out))
        x0, p = old.copy(), np.zeros(len(old))  # [L], [L]
        x0[rows], p[rows] = ids, probs
        p[x0 == mask_id] = -np.inf  # the mask token is never written
        m2t, t2t = policy.select(x0, p, act, ~is_mask & ~prompt, old)
        m2t, t2t = m2t & act, t2t & ~is_mask & ~prompt
        new = np.where(m2t | t2t, x0, old)  # [L]
        if run.guide is not None:
            new = run.guide.settle(run.canvas, ws, we, new, p, out, rows)
            t2t &= new != old
        run.canvas[ws:we] = new
        un, ed = np.flatnonzero(m2t), np.flatnonzero(t2t)
        run.steps += 1
        run.edits += len(ed)
        yield StepEvent(k, step, ws, tuple(run.canvas[ws:we].tolist()), tuple(un.tolist()),
                        tuple((int(i), int(old[i]), int(x0[i])) for i in ed),
                        tuple(float(p[i]) for i in (*un, *ed)), run.forwards, run.commits,
                        int((run.canvas[s0:we] == mask_id).sum()), run.elapsed())
        if policy.block_done(bool(act.any()), bool(len(ed))):
            return
    raise DecodeError(f"block {k} did not converge in {cap} steps (the model keeps predicting the mask token)",
                      "check the model's mask token id")


def _decode_block_indel(run: _Run, policy: LevenshteinPolicy, k: int) -> Iterator[StepEvent]:
    """Refine block ``k`` with LLaDA2.2's Levenshtein policy; the block is re-laid after every DELETE/INSERT."""
    model, mask_id, s0, we = run.model, run.model.mask_id, k * run.B, (k + 1) * run.B
    prompt = np.arange(s0, we) < run.P  # [B]
    policy.begin_block(run.canvas[s0:we], prompt)
    banned = np.array([policy.delete_id, policy.split_id])
    for step in range(policy.max_steps):
        old = run.canvas[s0:we].copy()  # [B]
        is_mask = (old == mask_id) & ~prompt  # [B]
        rows = np.flatnonzero(~prompt if policy.edits else is_mask)  # [n]
        out = model.step(old.tolist(), s0, rows.tolist(), want_logits=run.want_logits)
        run.forwards += 1
        pred = _Prediction(run, out, rows, old, s0, banned)
        x0, p = pred.top1(allow_edits=policy.indel)  # [B], [B]
        x1 = pred.x1
        scrub: Scrub = pred.scrub
        settle: Settle | None = None
        eg = run.edit_guide
        if eg is not None:  # allowed tokens and feasible edits only; writes re-checked after each shift
            c = eg.predict(run.canvas, s0, we, rows, _with_logits(out), x0, p, x1, scrub)
            x0, p, x1, scrub = c.x0, c.p, c.x1, c.scrub
            settle = partial(eg.settle, run.canvas, s0, we, p=p, out=out, rows=rows, prompt=prompt)
        d = policy.decide(old, x0, p, x1, scrub, settle)
        run.canvas[s0:we] = d.ops.block
        after = d.ops.after  # [B]
        un, ed = np.flatnonzero(d.m2t & ~np.isin(d.new, banned)), np.flatnonzero(d.t2t & ~np.isin(d.new, banned))
        run.steps += 1
        run.edits += len(ed)
        run.inserts += len(d.ops.inserted)
        run.deletes += len(d.ops.deleted)
        yield StepEvent(k, step, s0, tuple(run.canvas[s0:we].tolist()),
                        tuple(int(after[i]) for i in un if after[i] >= 0),
                        tuple((int(after[i]), int(old[i]), int(d.new[i])) for i in ed if after[i] >= 0),
                        tuple(float(p[i]) for i in (*un, *ed) if after[i] >= 0)
                        + tuple(float(p[b]) for b, _, _ in d.ops.deleted) + tuple(float(p[b]) for b, _ in d.ops.inserted),
                        run.forwards, run.commits, int((run.canvas[s0:we] == mask_id).sum()), run.elapsed(),
                        d.ops.deleted, d.ops.inserted, d.ops.truncated)
        if d.done:
            return
    raise DecodeError(f"block {k} did not end in {policy.max_steps} steps", "lower --max-post-steps")


class _Prediction:
    """Per-position predictions of one step over the block [B]; edit tokens can be excluded on demand.

    Greedy: top-1 from the step, or top-2 where top-1 is an excluded edit token; where both are, the step is
    re-run for its logits (one more forward, counted) and the best allowed token is read from them.
    Sampling: drawn from the logits with the excluded tokens removed.
    """

    def __init__(self, run: _Run, out: StepOutput, rows: np.ndarray, block: np.ndarray, start: int,
                 banned: np.ndarray) -> None:
        self.run, self.out, self.rows, self.block, self.start, self.banned = run, out, rows, block, start, banned
        self.x1 = block.copy()  # [B] top-2 ids (anti-loop alternatives)
        self.x1[rows] = out.ids[:, 1]

    def top1(self, allow_edits: bool) -> tuple[np.ndarray, np.ndarray]:
        """``(x0, p)`` [B]: the predicted id and its probability (prompt and unrequested rows: -inf)."""
        x0, p = self.block.copy(), np.full(len(self.block), -np.inf)  # [B], [B]
        ids, probs = self.run.sampler(self.out, self.run.rng, self.run.model.mask_id)  # [n], [n]
        x0[self.rows], p[self.rows] = ids, probs
        if not allow_edits:
            bad = np.isin(x0, self.banned) & np.isin(np.arange(len(x0)), self.rows)  # [B]
            if bad.any():
                alt, alt_p = self._allowed(bad)
                x0, p = np.where(bad, alt, x0), np.where(bad, alt_p, p)
        return x0, p

    def scrub(self, bad: np.ndarray) -> np.ndarray:
        """Best ids [B] at the ``bad`` positions that are neither DELETE nor SPLIT (elsewhere: the block)."""
        return self._allowed(bad)[0]

    def _allowed(self, bad: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ids, probs = self.block.copy(), np.zeros(len(self.block))  # [B], [B]
        where = {int(r): i for i, r in enumerate(self.rows)}
        need = []
        for pos in np.flatnonzero(bad).tolist():
            i = where[pos]
            if not self.run.sampler.needs_logits and int(self.out.ids[i, 1]) not in self.banned:
                ids[pos], probs[pos] = self.out.ids[i, 1], self.out.probs[i, 1]
            else:
                need.append((pos, i))
        if need:
            logits = self._logits()  # [n, V]
            masked = np.array(logits[[i for _, i in need]], dtype=np.float64)  # [m, V]
            masked[:, self.banned] = -np.inf
            out = StepOutput(np.zeros((len(need), 2), np.int32), np.zeros((len(need), 2), np.float32), masked)
            if self.run.sampler.needs_logits:
                got, got_p = self.run.sampler(out, self.run.rng, self.run.model.mask_id)  # [m], [m]
            else:
                top = top2_from_logits(masked, self.run.model.mask_id)
                got = top.ids[:, 0].astype(np.int64)  # [m]
                full = filtered_probs(logits[[i for _, i in need]], self.run.model.mask_id, temperature=1.0)  # [m, V]
                got_p = full[np.arange(len(got)), got]  # the head's p: softmax without the mask only
            for (j, _), t, q in zip(need, got, got_p):
                ids[j], probs[j] = t, q
        return ids, probs

    def _logits(self) -> np.ndarray:
        if self.out.logits is None:
            self.out = self.run.model.step(self.block.tolist(), self.start, self.rows.tolist(), want_logits=True)
            self.run.forwards += 1
        assert self.out.logits is not None
        return self.out.logits


def _with_logits(out: StepOutput) -> StepOutput:
    if out.logits is None:
        raise DecodeError("a constrained step needs the logits of its rows", "this model step returned none")
    return out


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
