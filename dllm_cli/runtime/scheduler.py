"""A scheduler over sequences: every active request's engine call of one tick goes into one decode.

Each request runs the unchanged block loop (``decoding.engine``) on its own thread, against a ``SlotModel``:
a ``StepModel`` whose ``step`` and ``commit`` hand their work to the ``Scheduler`` and wait. The thread that
owns the ``BatchContext`` calls ``pump``; a tick happens once every attached request is waiting on an op, so
one tick advances each of them by exactly one step, one block commit or one prefill chunk. A long prompt is
prefilled in block-aligned chunks that fill the room the steps leave, so it never stalls the others.

Fairness follows: with ``n`` active requests a tick costs about ``n`` steps of work on a CPU (less on a GPU),
and a short request needs as many ticks as it needs forwards alone.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

from dllm_cli.decoding.stepper import StepOutput, WantLogits
from dllm_cli.errors import DecodeError, DllmError
from dllm_cli.runtime.batch import BatchContext, Work
from dllm_cli.runtime.session import sort_rows


class Cancelled(DllmError):
    """The request was cancelled (its client went away or the server is stopping) while it waited for a tick."""


@dataclass
class _Op:
    """A pending ``step`` or ``commit`` of one slot; ``done`` counts the committed tokens so far."""

    seq: int
    tokens: list[int]
    start: int
    keep: bool
    rows: list[int] = field(default_factory=list)
    want_logits: bool = False
    attn_block: int | None = None
    done: int = 0
    result: StepOutput | None = None
    error: BaseException | None = None
    finished: threading.Event = field(default_factory=threading.Event)


class Scheduler:
    """Batches the engine calls of the requests attached to ``ctx``'s sequences, one decode (or a few) per tick."""

    def __init__(self, ctx: BatchContext) -> None:
        self.ctx = ctx
        self.cv = threading.Condition()
        self._attached: dict[int, Callable[[], bool]] = {}  # seq -> "is this request cancelled?"
        self._pending: dict[int, _Op] = {}
        self._rr = 0  # round-robin start for prefill chunks
        self.ticks = 0
        self.closed = False

    # --- request side ------------------------------------------------------------------------------
    def slot(self, seq: int) -> "SlotModel":
        return SlotModel(self, seq)

    @contextmanager
    def attached(self, seq: int, cancelled: Callable[[], bool] = lambda: False) -> Iterator["SlotModel"]:
        """Take part in ticks while the block runs: every tick waits for this sequence's next op."""
        with self.cv:
            if seq in self._attached:
                raise DecodeError(f"slot {seq} is already serving a request")
            self._attached[seq] = cancelled
            self.cv.notify_all()
        try:
            yield self.slot(seq)
        finally:
            with self.cv:
                self._attached.pop(seq, None)
                self.cv.notify_all()

    def submit(self, op: _Op) -> _Op:
        """Queue ``op`` for the next tick and wait for its result (an error is raised here)."""
        with self.cv:
            if self.closed:
                raise Cancelled("the server is stopping")
            if op.seq not in self._attached:
                raise DecodeError(f"slot {op.seq} is not attached to the scheduler")
            self._pending[op.seq] = op
            self.cv.notify_all()
        op.finished.wait()
        if op.error is not None:
            raise op.error
        return op

    def rollback(self, seq: int, pos: int) -> None:
        with self.cv:  # never during a decode: a tick holds the lock
            self.ctx.rollback(seq, pos)

    # --- owner side --------------------------------------------------------------------------------
    @property
    def active(self) -> int:
        return len(self._attached)

    def _ready(self) -> bool:
        return bool(self._pending) and all(s in self._pending for s in self._attached)

    def pump(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s for every attached request to be waiting, then run one tick; True if it ran."""
        with self.cv:
            if not self.cv.wait_for(self._ready, timeout):
                return False
            try:
                self._tick()
            except BaseException as e:  # never leave a request waiting on a tick that will not come
                for op in list(self._pending.values()):
                    self._finish(op, e)
                raise
            return True

    def close(self) -> None:
        """Fail every pending and future op with ``Cancelled`` (the owner stops pumping)."""
        with self.cv:
            self.closed = True
            for op in self._pending.values():
                self._finish(op, Cancelled("the server is stopping"))
            self._pending.clear()

    # --- one tick ----------------------------------------------------------------------------------
    def _tick(self) -> None:
        ops = list(self._pending.values())
        for op in ops:
            cancelled = self._attached.get(op.seq)
            if cancelled is None or cancelled():
                self._finish(op, Cancelled("the request was cancelled"))
        ops = [op for op in ops if not op.finished.is_set()]
        for works in self._plan(ops):
            by_seq = {op.seq: op for op in ops}
            try:
                outs = self.ctx.decode(works)
            except BaseException as e:  # every op in the failed decode gets the error; the others go on
                for w in works:
                    self._finish(by_seq[w.seq], e)
                continue
            for w, out in zip(works, outs):
                op = by_seq[w.seq]
                if w.keep:
                    op.done += len(w.tokens)
                    if op.done == len(op.tokens):
                        self._finish(op)
                else:
                    op.result = out
                    self._finish(op)
        self.ticks += 1

    def _finish(self, op: _Op, error: BaseException | None = None) -> None:
        op.error = error
        self._pending.pop(op.seq, None)
        op.finished.set()

    def _plan(self, ops: Sequence[_Op]) -> list[list[Work]]:
        """The decodes of a tick: steps grouped by attention block and packed into ``n_ubatch``, then prefill
        and commit chunks (whole blocks) filling the room left, round-robin so no prompt waits for another."""
        cap, B = self.ctx.n_ubatch, self.ctx.block_length
        decodes: list[tuple[int | None, list[Work], int]] = []  # (attn_block, works, tokens)

        def place(work: Work, key: int | None) -> None:
            for i, (k, works, used) in enumerate(decodes):
                if k == key and used + len(work.tokens) <= cap:
                    works.append(work)
                    decodes[i] = (k, works, used + len(work.tokens))
                    return
            decodes.append((key, [work], len(work.tokens)))

        for op in ops:
            if not op.keep:
                key = None if op.attn_block in (None, B) else op.attn_block
                place(Work(op.seq, op.tokens, op.start, False, op.rows, op.want_logits, op.attn_block), key)
        commits = [op for op in ops if op.keep]
        if commits:
            self._rr = (self._rr + 1) % len(commits)
            commits = commits[self._rr:] + commits[:self._rr]
        for op in commits:
            left = len(op.tokens) - op.done
            room = max((cap - used for k, _, used in decodes if k is None), default=0)
            n = min(left, room // B * B) or min(left, cap // B * B)  # no room: a decode of its own
            place(Work(op.seq, op.tokens[op.done:op.done + n], op.start + op.done, True), None)
        return [works for _, works, _ in decodes]


class SlotModel:
    """The ``StepModel`` one request's engine drives: sequence ``seq`` of the scheduler's context."""

    def __init__(self, scheduler: Scheduler, seq: int) -> None:
        ctx = scheduler.ctx
        self.scheduler, self.seq = scheduler, seq
        self.n_vocab, self.mask_id, self.block_length = ctx.n_vocab, ctx.mask_id, ctx.block_length
        self.eos_id, self.edit_ids = ctx.model.eos_id, ctx.model.edit_ids
        self.n_ctx, self.n_ubatch = ctx.n_ctx, ctx.n_ubatch

    @property
    def cached(self) -> list[int]:
        return self.scheduler.ctx.cached[self.seq]

    def commit(self, tokens: Sequence[int], start: int) -> None:
        """Decode ``tokens`` at ``start..`` and keep their K/V; long prompts go in chunks over several ticks."""
        toks = [int(t) for t in tokens]
        if toks:
            self.scheduler.submit(_Op(self.seq, toks, start, True))

    def step(self, tokens: Sequence[int], start: int, rows: Sequence[int], want_logits: WantLogits = False,
             attn_block: int | None = None) -> StepOutput:
        """Decode the active block (or window) against the slot's cache at the next tick; cells are dropped."""
        rows = [int(r) for r in rows]
        srows, inv = sort_rows(rows)
        if len(set(srows)) != len(srows):
            raise DecodeError(f"output rows {rows} repeat a row")
        # other sequences decode before this one reads its rows: a "view" is copied like True (batch._read)
        op = self.scheduler.submit(_Op(self.seq, [int(t) for t in tokens], start, False, srows, bool(want_logits),
                                       attn_block))
        out = op.result
        assert out is not None
        logits = None if not want_logits else out.logits
        if inv is not None:  # unsorted rows: back to the caller's order (copies)
            return StepOutput(ids=out.ids[inv], probs=out.probs[inv], logits=None if logits is None else logits[inv])
        return StepOutput(ids=out.ids, probs=out.probs, logits=logits)  # already the work's own copy

    def rollback(self, pos: int) -> None:
        self.scheduler.rollback(self.seq, pos)
