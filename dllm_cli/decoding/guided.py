"""Constrained steps for the block loop: predictions from the allowed tokens only, and writes that stay feasible.

``Constraint`` is what a front end compiles once (``dllm_cli.constrain``); ``Guide`` applies it to one
generation. The constrained region of a window is ``[max(P, ws), min(we, P + max_tokens))``: the answer's cells
that can still be output (cells past ``max_tokens`` are cut anyway, and the future after the region is left
unbounded, so running out of tokens ends with ``finish_reason`` "length" and the text so far).

**Confidence under a constraint** is the probability renormalised over the allowed set, as masked logits give in
autoregressive constrained decoding: greedy picks ``argmax`` of the logits over the allowed tokens and its
confidence is ``softmax(logits restricted to allowed)`` at that token (the mask token excluded, as the confidence
head does); sampling applies the constraint first, then temperature, top-k and top-p, and draws from that.

**Several writes per step.** Every prediction is allowed *alone* against the pre-step canvas, but two writes may
conflict. ``settle`` commits them one at a time in confidence order (highest first, ties: lower position),
re-checking each against the canvas as already updated; a write that became infeasible is replaced by the best
allowed token of its row under the updated canvas (an edit whose best is the old token is dropped). Cheaper rule,
used when the step only unmasks: if writing all of them at once is feasible, accept them all. It is equivalent:
a canvas stays completable when a placed token is turned back into a mask (a mask admits that token), so every
intermediate canvas of the one-at-a-time order is a relaxation of the joint one and each write passes its check.
Edits (T2T) are not relaxations (the alternative to an edit is the old token, not a mask), so steps with edits
always take the one-at-a-time order.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dllm_cli.decoding.automaton import Automaton
from dllm_cli.decoding.constraint import Checker
from dllm_cli.decoding.pick import ClassIndex, greedy
from dllm_cli.decoding.sampling import Sampler, filtered_probs
from dllm_cli.decoding.stepper import StepOutput


@dataclass(frozen=True)
class Constraint:
    """A compiled constraint: its kind (``json_schema``, ``regex``, ``tool_call``), source text and automaton."""

    kind: str
    source: str
    automaton: Automaton


class Guide:
    """One generation's constraint state (see the module doc); arrays span the forwarded window ``[ws, we)``."""

    def __init__(self, constraint: Constraint, *, mask_id: int, P: int, max_tokens: int, sampler: Sampler,
                 rng: np.random.Generator) -> None:
        self.checker = Checker(constraint.automaton, mask_id)
        self.n_classes = int(constraint.automaton.delta.shape[1])
        self.index = ClassIndex(constraint.automaton.token_class, self.n_classes)
        self.mask_id, self.P, self.end = int(mask_id), int(P), int(P + max_tokens)
        self.sampler, self.rng = sampler, rng
        self.rechecks = 0  # writes that had to be re-picked (a test and bench figure)

    def _region(self, canvas: np.ndarray, ws: int, we: int) -> tuple[int, int, np.ndarray]:
        """``(lo, hi, start)``: region bounds relative to ``ws`` and the start state set after the prefix."""
        lo, hi = max(self.P, ws), max(min(we, self.end), max(self.P, ws))
        start = self.checker.start(self.checker.prefix_state(canvas[self.P:lo]))
        return lo - ws, hi - ws, start

    def predict(self, canvas: np.ndarray, ws: int, we: int, rows: np.ndarray, out: StepOutput,
                ids: np.ndarray | None = None, probs: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Constrained ``(ids, probs)`` for ``rows`` (window-relative, [n]) from the step's output (logits needed).

        Rows outside the region keep the given unconstrained ``ids``/``probs``; without them every row is picked
        here (outside the region from the whole vocabulary), with one draw per row in row order, as the
        unconstrained sampler draws: a constraint that allows everything changes no token.
        """
        lo, hi, start = self._region(canvas, ws, we)
        inside = (rows >= lo) & (rows < hi)  # [n]
        sel = np.flatnonzero(inside) if ids is not None else np.arange(len(rows))  # [k] indices into rows
        allowed = np.ones((len(sel), self.n_classes), dtype=bool)  # [k, C]: all classes = unconstrained
        mine = inside[sel]
        if mine.any():
            allowed[mine] = self.checker.allowed_class_rows(start, canvas[ws + lo:ws + hi], rows[sel][mine] - lo)
        got, got_p = self.pick(out, sel, allowed, ~mine)
        if ids is None or probs is None:
            return got, got_p
        ids, probs = ids.copy(), probs.astype(np.float64).copy()
        ids[sel], probs[sel] = got, got_p
        return ids, probs

    def pick(self, out: StepOutput, sel: np.ndarray, allowed: np.ndarray,
             free: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Best (greedy) or drawn (sampling) allowed token of the output rows ``sel`` [k] with ``allowed`` token
        classes [k, C], and its renormalised probability. ``free`` [k] marks unconstrained rows. [k], [k]."""
        logits = out.logits
        assert logits is not None
        free = np.zeros(len(sel), dtype=bool) if free is None else free
        if not self.sampler.needs_logits:
            got, got_p = np.zeros(len(sel), dtype=np.int64), np.zeros(len(sel))
            for j, r in enumerate(sel.tolist()):
                if free[j]:  # the head's own choice, as the unconstrained sampler takes it
                    got[j], got_p[j] = int(out.ids[r, 0]), float(out.probs[r, 0])
                else:
                    got[j], got_p[j] = greedy(logits[r], allowed[j], self.index, out.ids[r], out.probs[r],
                                              self.mask_id)
            return got, got_p
        tok = allowed[:, self.index.token_class] | free[:, None]  # [k, V]
        lg = np.where(tok, np.asarray(logits[sel], dtype=np.float64), -np.inf)  # [k, V]
        lg[:, self.mask_id] = -np.inf
        s = self.sampler
        p = filtered_probs(lg, self.mask_id, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p)  # [k, V]
        cdf = np.cumsum(p, axis=1)  # [k, V]
        u = self.rng.random(len(p)) * cdf[:, -1]  # [k]
        got = np.minimum((cdf <= u[:, None]).sum(axis=1), p.shape[1] - 1)  # [k]
        got = np.where(p[np.arange(len(got)), got] > 0, got, p.argmax(axis=1))
        return got.astype(np.int64), p[np.arange(len(got)), got]

    def settle(self, canvas: np.ndarray, ws: int, we: int, new: np.ndarray, p: np.ndarray, out: StepOutput,
               rows: np.ndarray) -> np.ndarray:
        """The window ``[L]`` after writing ``new`` [L] over ``canvas[ws:we]`` while staying feasible.

        ``p`` [L] orders the writes; ``out`` (its rows are the window positions ``rows``) gives re-picks.
        Positions outside the region are written as given.
        """
        old = canvas[ws:we]
        lo, hi, start = self._region(canvas, ws, we)
        cur = new.copy()  # [L]
        cur[lo:hi] = old[lo:hi]
        changed = np.flatnonzero(new[lo:hi] != old[lo:hi]) + lo  # [m]
        if not len(changed):
            return cur
        edits = bool((old[changed] != self.mask_id).any())
        if not edits and self.checker.feasible(start, new[lo:hi]):
            return new.copy()
        where = {int(r): j for j, r in enumerate(rows.tolist())}
        for i in changed[np.argsort(-p[changed], kind="stable")].tolist():
            allowed = self.checker.allowed_at(start, cur[lo:hi], i - lo)[None, :]  # [1, C]
            if allowed[0, self.index.token_class[int(new[i])]]:
                cur[i] = new[i]
                continue
            self.rechecks += 1
            if i in where:
                got, _ = self.pick(out, np.array([where[i]]), allowed)
                cur[i] = got[0]
            elif old[i] == self.mask_id:  # no prediction for this row (never reached by the engine)
                cur[i] = int(np.flatnonzero(allowed[0][self.index.token_class])[0])
        return cur
