"""LLaDA2.2 insert/delete under a constraint: edits are offered where they keep the answer completable, and a
step's writes are applied one at a time in confidence order, each re-checked on the canvas after its shift.

**What an edit does here** (``levenshtein.apply_edit_ops``, spec §5.5), on the block ``c[0:B]``: DELETE at ``j``
removes the cell (the cells after it move one left, a new mask is appended at the block end); SPLIT at ``j`` opens a
new mask at ``j`` and moves the cell it was written over, and every later one, one right (the block's last cell is
pushed out). The constrained region ``[lo, hi)`` and its automaton check are ``guided``'s and ``constraint``'s: a
committed prefix, then the region's cells, then an unbounded future (cells past ``max_tokens`` are never output).

**Offering** (``EditGuide.predict``, pick time). Every answer row first gets its best allowed text token
(``Guide.predict``). With ``F`` the forward sets of the pre-step region ``c[lo:hi]`` (``constraint.Checker``):

* DELETE at region cell ``i`` keeps the canvas completable iff ``F[i] ∩ Gd[i] ≠ ∅``, ``Gd`` the backward sets of
  ``c[lo+1:hi+1]``, the region after that shift (``c[hi]``, the cell that moves in, is the block's next cell, or the
  appended mask when the region ends with the block);
* SPLIT at ``i`` iff some successor of ``F[i]`` (the new mask) lies in ``Gs[i]``, ``Gs`` the backward sets of
  ``c[lo:hi-1]`` (the region's last cell moves out).

One forward and three backward passes give every row's two answers (``edit_feasibility``, checked against
``apply_edit_ops`` + a full check in the tests). A feasible edit competes with the row's text pick by logit.
Confidence is renormalised over the allowed set, now the allowed text tokens plus the feasible edits, as
``guided`` defines it: with ``t`` the text pick, ``p_t`` its probability over the allowed text and ``E`` the feasible
edits, ``p'(x) = p_t e^(l_x - l_t) / (1 + p_t Σ_{e ∈ E} e^(l_e - l_t))``. The anti-loop alternative of a row is its
unconstrained second choice when that is allowed alone, else the text pick. Under a constraint that allows every
text token and edit, the ids, probabilities (up to the mass of control tokens, which no constraint allows) and
alternatives are the unconstrained ones; LLaDA2.2 decodes one block at a time (no ``--mbe``), so the region lies in
the active block.

**Settling** (``EditGuide.settle``). Writes allowed alone may conflict, and a shift moves every later cell. When a
step writes an edit inside the region, all its writes (unmasks, substitutions, DELETEs, SPLITs) are taken one at a
time in confidence order (highest first, ties: lower position). Each is applied with ``apply_edit_ops`` on top of
the writes already accepted, so positions, masks and placed tokens are re-indexed after every shift, and the
region after it is re-checked:

* an edit is kept only if the shifted canvas is still completable; otherwise it is skipped (its cell keeps what it
  held), and the next write is checked against the canvas with the writes accepted so far;
* a token write is checked at its position after the shifts; one that no longer fits is re-picked from the tokens
  allowed there (as ``Guide.settle`` does). A write that leaves the region as it was (one past it, or one an
  accepted insert pushed out of it) is kept as given; one that an accepted delete pulled into it is checked.

End ids are tokens of the automaton, so a shift that would leave an end id where the answer is incomplete, or text
after one, makes the canvas infeasible and is refused. A step without an edit in the region is settled by
``Guide.settle`` (the same confidence order). Every accepted canvas is completable, so the final round (which writes
no edit) can always fill the block.

This follows Mündler et al., "Constrained Decoding of Diffusion LLMs with Context-Free Grammars"
(arXiv 2508.10111): constrained diffusion decoding is additive infilling, decided for regular languages by
intersecting the automaton with the canvas. An insert or a delete changes the infilling problem (cells move,
masks appear), so the intersection is re-run on the changed canvas after each one.

Greedy only: LLaDA2.2 edits greedily, as its reference decoder (``DecodeConfig`` refuses ``temperature > 0`` with
editing on a 2.2 model), so a sampling step is offered no edit.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from dllm_cli.decoding.constraint import Checker
from dllm_cli.decoding.guided import Guide
from dllm_cli.decoding.levenshtein import EditOps, apply_edit_ops
from dllm_cli.decoding.stepper import StepOutput


def edit_feasibility(checker: Checker, start: np.ndarray, block: np.ndarray, lo: int, hi: int,
                     F: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(delete_ok, split_ok)`` [hi - lo] bool: whether DELETE / SPLIT alone at each region cell of ``block`` [B]
    keeps the region ``block[lo:hi]`` completable from the start states ``start`` [S] (see the module doc).
    ``F`` [hi - lo + 1, S]: the region's forward sets, when the caller has them."""
    S = checker.a.n_states
    cells = block[lo:hi]  # [n]
    n = len(cells)
    after = int(block[hi]) if hi < len(block) else checker.mask_id  # the cell a delete pulls into the region
    F = (checker.forward(start, cells) if F is None else F)[:n]  # [n, S]
    Gd = checker.backward(np.append(cells[1:], after))[:n, :S]  # [n, S]: before c[lo+i+1 .. hi]
    Gs = checker.backward(cells[:-1])  # [n, S + 1]: before c[lo+i .. hi-2], then the future
    delete_ok = (F & Gd).any(axis=1)  # [n]
    split_ok = (F[:, checker.e_src] & Gs[:, checker.e_dst]).any(axis=1)  # [n]: an edge s -> s' for the new mask
    return delete_ok, split_ok


@dataclass(frozen=True)
class EditPrediction:
    """One constrained 2.2 step's predictions over the block [B] (prompt and unrequested rows: as given)."""

    x0: np.ndarray  # [B] int64: the pick, a DELETE/SPLIT id where that is offered and the most likely
    p: np.ndarray  # [B] float64: its confidence, renormalised over the allowed set
    x1: np.ndarray  # [B] int64: the anti-loop alternative
    scrub: Callable[[np.ndarray], np.ndarray]  # final round: bool [B] -> best non-edit ids there (allowed ones inside)


class EditGuide:
    """Constrained LLaDA2.2 steps of one generation (see the module doc): ``predict`` then ``settle``."""

    def __init__(self, guide: Guide, *, delete_id: int, split_id: int, indel: bool) -> None:
        self.guide, self.checker = guide, guide.checker
        self.delete_id, self.split_id, self.indel = int(delete_id), int(split_id), bool(indel)
        self.edit_ids = np.array([delete_id, split_id], dtype=np.int64)
        self.rejected = 0  # edits skipped by settle: the canvas after their shift was not completable
        self.accepted = 0  # edits that moved region cells and that settle kept

    def region(self, canvas: np.ndarray, s0: int, we: int) -> tuple[int, int, np.ndarray]:
        """``(lo, hi, start)``: the region relative to the block start ``s0`` and the start states after its prefix."""
        g = self.guide
        lo, hi = max(g.P, s0), max(min(we, g.end), max(g.P, s0))
        return lo - s0, hi - s0, self.checker.start(self.checker.prefix_state(canvas[g.P:lo]))

    def predict(self, canvas: np.ndarray, s0: int, we: int, rows: np.ndarray, out: StepOutput, x0: np.ndarray,
                p: np.ndarray, x1: np.ndarray, scrub: Callable[[np.ndarray], np.ndarray]) -> EditPrediction:
        """Constrained predictions for the block ``canvas[s0:we]`` from the step ``out`` (its rows: block positions
        ``rows`` [n], logits needed) and the unconstrained ``x0``/``p``/``x1`` [B]; ``scrub`` is the unconstrained
        final-round replacement, kept outside the region."""
        x0, p, x1 = x0.copy(), p.astype(np.float64).copy(), x1.copy()
        x0[rows], p[rows] = self.guide.predict(canvas, s0, we, rows, out, x0[rows], p[rows])
        text = x0.copy()  # [B]
        lo, hi, start = self.region(canvas, s0, we)
        inside = (rows >= lo) & (rows < hi)  # [n]
        mine = np.zeros(len(x0), dtype=bool)  # [B]
        mine[rows[inside]] = True
        if inside.any():
            self._offer(canvas[s0:we], lo, hi, start, rows, inside, out, text, x0, p, x1)

        def constrained_scrub(bad: np.ndarray) -> np.ndarray:
            got = scrub(bad & ~mine) if (bad & ~mine).any() else canvas[s0:we].copy()
            return np.where(bad & mine, text, got)

        return EditPrediction(x0, p, x1, constrained_scrub)

    def _offer(self, block: np.ndarray, lo: int, hi: int, start: np.ndarray, rows: np.ndarray, inside: np.ndarray,
               out: StepOutput, text: np.ndarray, x0: np.ndarray, p: np.ndarray, x1: np.ndarray) -> None:
        """Let feasible edits compete with the text picks ``text`` [B] (in place on ``x0``/``p``: equal to ``text``
        on entry), and set the alternatives ``x1``."""
        ch, cls = self.checker, self.guide.index.token_class
        cells = block[lo:hi]
        F, G = ch.forward(start, cells), ch.backward(cells)
        offer = self.indel and not self.guide.sampler.needs_logits
        if offer:
            delete_ok, split_ok = edit_feasibility(ch, start, block, lo, hi, F)  # [n], [n]
        logits = out.logits
        assert logits is not None
        for r in np.flatnonzero(inside).tolist():
            j = int(rows[r])
            i = j - lo
            feasible = {self.delete_id: bool(delete_ok[i]), self.split_id: bool(split_ok[i])} if offer else {}
            edits = [e for e, ok in feasible.items() if ok]
            if edits:
                t, lg = int(x0[j]), logits[r]
                w = np.exp(np.minimum(np.asarray(lg[edits], dtype=np.float64) - float(lg[t]), 700.0))  # [m]
                z = 1.0 + float(p[j]) * float(w.sum())
                best = int(np.argmax(w))  # w: e^(l_e - l_t), capped against overflow
                if w[best] > 1.0:  # an edit beats the text pick (ties: the text)
                    x0[j], p[j] = edits[best], float(p[j]) * float(w[best]) / z
                else:
                    p[j] = float(p[j]) / z
            second = int(out.ids[r, 1])
            if second in feasible:
                ok = feasible[second]
            else:  # some reachable state steps with it into a state that completes the rest
                ok = bool(G[i + 1][ch.delta[F[i], cls[second]]].any())
            x1[j] = second if ok else int(text[j])

    def _apply(self, written: np.ndarray, old: np.ndarray, prompt: np.ndarray) -> EditOps:
        """``apply_edit_ops`` of the written block [B] over ``old`` [B] (only the shifted ids are used)."""
        return apply_edit_ops(written, old, np.zeros(len(old), dtype=bool), prompt, mask_id=self.guide.mask_id,
                              delete_id=self.delete_id, split_id=self.split_id)

    def settle(self, canvas: np.ndarray, s0: int, we: int, written: np.ndarray, p: np.ndarray, out: StepOutput,
               rows: np.ndarray, prompt: np.ndarray) -> np.ndarray:
        """The written block [B] (pre-shift positions, edit ids included) to apply instead of ``written`` [B].

        ``p`` [B] orders the writes, ``out`` (rows: block positions ``rows``) gives re-picks, ``prompt`` [B] marks
        prompt cells (never written). See the module doc.
        """
        g, ch, cls = self.guide, self.checker, self.guide.index.token_class
        old = canvas[s0:we]  # [B]
        lo, hi, start = self.region(canvas, s0, we)
        changed = np.flatnonzero(written != old)  # [m]
        inside = changed[(changed >= lo) & (changed < hi)]
        if not np.isin(written[inside], self.edit_ids).any():
            return g.settle(canvas, s0, we, written, p, out, rows)
        where = {int(r): k for k, r in enumerate(rows.tolist())}
        acc = old.copy()  # [B]: the writes accepted so far
        cur = old[lo:hi]  # the region of the canvas they make
        F = ch.forward(start, cur)  # [n + 1, S]: its forward sets, kept up to date (a write changes a suffix)
        for j in changed[np.argsort(-p[changed], kind="stable")].tolist():
            trial = acc.copy()
            trial[j] = written[j]
            ops = self._apply(trial, old, prompt)
            cells = ops.block[lo:hi]
            diff = np.flatnonzero(cells != cur)
            if not len(diff):  # the region is unchanged (a write past it, or one pushed out of it)
                acc = trial
                continue
            d = int(diff[0])
            if int(written[j]) in (self.delete_id, self.split_id):
                tail = ch.forward(F[d], cells[d:])  # [n - d + 1, S]
                if (tail[-1] & ch.live[:-1]).any():
                    acc, cur, F, self.accepted = trial, cells, np.concatenate([F[:d], tail]), self.accepted + 1
                else:
                    self.rejected += 1
                continue
            # a token write changed only its own cell d: where it is after the shifts
            allowed = ch.allowed_classes(F[d], ch.backward(cells[d + 1:])[0])  # [C]
            if not allowed[cls[int(written[j])]]:
                g.rechecks += 1
                if j in where:
                    trial[j] = cells[d] = int(g.pick(out, np.array([where[j]]), allowed[None, :])[0][0])
                else:  # no prediction for this row (never reached by the engine)
                    trial[j] = cells[d] = old[j] if old[j] != g.mask_id else np.flatnonzero(allowed[cls])[0]
            acc, cur, F = trial, cells, np.concatenate([F[:d], ch.forward(F[d], cells[d:])])
        return acc
