"""LLaDA2.2 joint decoding with Levenshtein editing: KEEP / SUBSTITUTE / DELETE / INSERT (spec §5.5).

The model writes two edit-control tokens like any other token: DELETE at position j removes x_j (the block
shifts left), SPLIT (INSERT) opens a new mask slot just before x_j (the block shifts right). After each step
``apply_edit_ops`` applies them and right-pads the block with masks or truncates it, so the block stays ``B``
tokens long and the KV discipline of spec §3.11 holds (the engine commits the block once, after its final edit).

Per step, on the active block (prompt positions are never written):

* **M2T with a schedule floor**: ``need = n0 // steps + (step < n0 % steps) + n_new`` masks must be unmasked,
  where ``n0`` counts the block's *original* masks at block entry and ``n_new`` the masks that an insert or the
  right padding created; every mask with ``p > threshold`` is unmasked if at least ``need`` pass, else the
  ``need`` most confident; from step ``steps`` on, every mask.
* **T2T**: every non-mask, non-prompt token whose argmax differs with ``p > editing_threshold``.
* **Post budget**: a step that starts with no original mask left spends one unit of ``max_post_steps`` (the
  count restarts if original masks reappear, as in the reference; SGLang keeps it cumulative).
* **Final round** (budget spent, ``max_post_steps == 0`` and this step fills the last original mask, or the
  step cap ``max_steps_per_block``): every mask is unmasked and no written position may hold DELETE or SPLIT
  (it takes the best other token instead), so the block ends without edit tokens or masks.
* **Anti-loop** (not on final rounds): a written block state already seen in this block is perturbed. dllm's
  deterministic variant (FluxServe's choice of position; the reference draws one at random): the changed
  positions are tried in ascending confidence (ties: lower position), each alone switched to the other of its
  top-2 tokens, and the first that gives an unseen state is kept; if none does, the step stands as written.
* The block ends after a final round, or after a step that started without masks and changed nothing.

Sources: the LLaDA2.2-flash remote code (``_joint_decode_block``) as ported by FluxServe, cross-checked with
SGLang ``JointThresholdInDel`` (spec §5.5, which lists their deviations). Token probabilities exclude the mask
token (the confidence head renormalises without it, as FluxServe sets the mask logit to -inf). Greedy only, as
in the reference.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from dllm_cli.decoding.threshold import top_confident

MAX_STEPS_PER_BLOCK = 1000  # the reference's max_steps_per_block


@dataclass(frozen=True)
class EditOps:
    """A block after its DELETE/SPLIT tokens were applied (spec §5.5 ``apply_edit_ops``).

    Positions are relative to the block start: ``before`` indexes the written block, ``after`` the result.
    """

    block: np.ndarray  # [B] int64 ids after the shift, padded with masks or truncated to B
    is_orig: np.ndarray  # [B] bool: an original mask (present at block entry) or a token carried from one
    after: np.ndarray  # [B] int64: where each position's token went (-1: deleted or pushed past the end)
    deleted: tuple[tuple[int, int, int], ...]  # (before, after, old id); after = where the gap closed
    inserted: tuple[tuple[int, int], ...]  # (before, after): SPLIT at `before` opened a mask slot at `after`
    truncated: tuple[int, ...]  # ids pushed past the block end by inserts


def apply_edit_ops(new: np.ndarray, old: np.ndarray, is_orig: np.ndarray, prompt: np.ndarray, *, mask_id: int,
                   delete_id: int, split_id: int) -> EditOps:
    """Apply the edit tokens of ``new`` (the written block) to ``old`` (the block before the write).

    DELETE drops the position; SPLIT puts a mask then the pre-write token ``old[j]`` (an insert before it);
    anything else stays. Prompt positions are copied from ``old``. The result is truncated or right-padded
    with masks (not original) to ``len(new)``. Arrays are ``[B]``.
    """
    B = len(new)
    out: list[int] = []
    trk: list[bool] = []
    after = np.full(B, -1, dtype=np.int64)  # [B]
    deleted: list[tuple[int, int, int]] = []
    inserted: list[tuple[int, int]] = []
    for j in range(B):
        t = int(new[j])
        if prompt[j]:
            out.append(int(old[j]))
            trk.append(False)
        elif t == delete_id:
            deleted.append((j, len(out), int(old[j])))
            continue
        elif t == split_id:
            inserted.append((j, len(out)))
            out += [mask_id, int(old[j])]
            trk += [False, bool(is_orig[j])]
        else:
            out.append(t)
            trk.append(bool(is_orig[j]))
        after[j] = len(out) - 1
    truncated = tuple(out[B:])
    after[after >= B] = -1
    pad = max(0, B - len(out))
    block = np.array(out[:B] + [mask_id] * pad, dtype=np.int64)  # [B]
    orig = np.array(trk[:B] + [False] * pad, dtype=bool)  # [B]
    deleted = [(b, min(a, B), o) for b, a, o in deleted]
    return EditOps(block, orig, after, tuple(deleted), tuple((b, a) for b, a in inserted if a < B), truncated)


Scrub = Callable[[np.ndarray], np.ndarray]  # boolean rows [B] -> best ids there that are not an edit token
Settle = Callable[[np.ndarray], np.ndarray]  # the written block [B] -> the written block to apply [B]


@dataclass(frozen=True)
class Decision:
    """One step's outcome: what was written (``new``, before the shift) and the block after it (``ops``)."""

    new: np.ndarray  # [B] the written block, edit tokens included
    m2t: np.ndarray  # [B] bool: masks written (with a token, DELETE or SPLIT)
    t2t: np.ndarray  # [B] bool: tokens rewritten
    ops: EditOps
    done: bool


class LevenshteinPolicy:
    """LLaDA2.2 joint M2T + T2T + DELETE/INSERT decoding of one block at a time (see the module docstring).

    ``editing`` turns T2T on, ``indel`` lets DELETE/SPLIT be written (they need ``editing``); with both off the
    policy is M2T with the schedule floor, and edit tokens are never written.
    """

    def __init__(self, *, threshold: float, editing_threshold: float, max_post_steps: int, editing: bool,
                 indel: bool, steps: int, mask_id: int, delete_id: int, split_id: int,
                 max_steps: int = MAX_STEPS_PER_BLOCK) -> None:
        self.threshold, self.editing_threshold = threshold, editing_threshold
        self.max_post_steps, self.steps, self.max_steps = max_post_steps, steps, max_steps
        self.edits, self.indel = editing, editing and indel
        self.mask_id, self.delete_id, self.split_id = mask_id, delete_id, split_id
        self.edit_ids = np.array([delete_id, split_id], dtype=np.int64)

    def begin_block(self, block: np.ndarray, prompt: np.ndarray) -> None:
        """Reset the per-block state: ``block`` [B] ids at entry, ``prompt`` [B] bool prompt-tail positions."""
        self.prompt = prompt.copy()
        self.is_orig = (block == self.mask_id) & ~prompt  # [B]
        self.n0 = int(self.is_orig.sum())
        self.step = self.post = 0
        self.seen: set[tuple[int, ...]] = set()

    def decide(self, block: np.ndarray, x0: np.ndarray, p: np.ndarray, x1: np.ndarray, scrub: Scrub,
               settle: Settle | None = None) -> Decision:
        """One step on ``block`` [B] from the top-1 ``x0``/``p`` and top-2 ``x1`` predictions [B] per position.

        With ``indel`` off the caller already replaced edit tokens in ``x0`` (and ``p``) by the best other
        token; ``scrub`` does that for the written positions of a final round. ``settle`` (a constraint's,
        ``guided_indel``) turns the written block into the one actually applied, before the shift.
        """
        M = self.mask_id
        maskpos = (block == M) & ~self.prompt  # [B]
        n_orig = int((maskpos & self.is_orig).sum())
        n_new = int(maskpos.sum()) - n_orig
        self.post = self.post + 1 if n_orig == 0 else 0
        m2t = self._m2t(maskpos, p, n_new)
        t2t = (~maskpos & ~self.prompt & (p > self.editing_threshold) & (x0 != block)) if self.edits \
            else np.zeros_like(maskpos)  # [B]
        if self.max_post_steps > 0:
            final = self.post >= self.max_post_steps
        else:
            final = n_orig > 0 and not (maskpos & self.is_orig & ~m2t).any()
        final = final or self.step >= self.max_steps - 1
        x = x0.copy()  # [B]
        if final:
            m2t = maskpos
            bad = (m2t | t2t) & np.isin(x, self.edit_ids)  # [B]
            if bad.any():
                x = np.where(bad, scrub(bad), x)
        new = np.where(m2t | t2t, x, block)  # [B]
        if self.edits and not final and tuple(new.tolist()) in self.seen:
            new = self._unloop(new, block, x0, x1, p)
        if settle is not None:
            new = settle(new)
        self.seen.add(tuple(new.tolist()))
        ops = apply_edit_ops(new, block, self.is_orig, self.prompt, mask_id=M, delete_id=self.delete_id,
                             split_id=self.split_id)
        self.is_orig = ops.is_orig
        self.step += 1
        unchanged = bool((new == block).all())
        done = final or (not maskpos.any() and unchanged) or (not self.edits and not (ops.block == M).any())
        return Decision(new, m2t & (new != block), t2t & (new != block), ops, done)

    def _m2t(self, maskpos: np.ndarray, p: np.ndarray, n_new: int) -> np.ndarray:
        """Masks to unmask: above the threshold if at least the schedule floor pass, else the most confident."""
        if not maskpos.any():
            return np.zeros_like(maskpos)
        if self.step >= self.steps:
            return maskpos
        base, rem = divmod(self.n0, self.steps)
        need = base + (1 if self.step < rem else 0) + n_new
        conf = np.where(maskpos, p, -np.inf)  # [B]
        hi = (conf > self.threshold) & maskpos  # [B]
        if int(hi.sum()) >= need:
            return hi
        return top_confident(conf, min(need, int(maskpos.sum())))

    def _unloop(self, new: np.ndarray, block: np.ndarray, x0: np.ndarray, x1: np.ndarray,
                p: np.ndarray) -> np.ndarray:
        """Switch one changed position to its other top-2 token so the written state is unseen (or keep ``new``)."""
        changed = np.flatnonzero(new != block)  # [n]
        for j in changed[np.argsort(p[changed], kind="stable")]:
            alt = int(x1[j]) if int(new[j]) == int(x0[j]) else int(x0[j])
            if not self.indel and alt in (self.delete_id, self.split_id):
                continue
            trial = new.copy()
            trial[j] = alt
            if tuple(trial.tolist()) not in self.seen:
                return trial
        return new
