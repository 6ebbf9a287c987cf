"""LLaDA2.0 confidence-threshold decoding (spec §5.1) and the policy interface the engine drives.

Per step: every masked position whose confidence is strictly above ``threshold`` is unmasked; when fewer than
the schedule's ``num_transfer[s]`` pass, the ``num_transfer[s]`` most confident masks are unmasked instead.
Tokens are only ever written at masks (no editing in 2.0).
"""
from __future__ import annotations

from typing import Protocol

import numpy as np


class Policy(Protocol):
    """What the block loop asks a decoding policy (arrays span the forwarded window)."""

    edits: bool  # True: needs predictions for every non-prompt row, False: only for masked rows

    def begin_block(self) -> None:
        """Reset per-block state."""

    def proceed(self, n_masks: int) -> bool:
        """Checked before each forward with the active block's mask count: False ends the block."""

    def select(self, x0: np.ndarray, p: np.ndarray, act: np.ndarray, editable: np.ndarray,
               old: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(m2t, t2t)`` boolean masks: positions to unmask (among ``act``) and to edit (among ``editable``)."""

    def block_done(self, had_masks: bool, edited: bool) -> bool:
        """Checked after applying a step (``had_masks`` = masks before it): True ends the block."""


def transfer_schedule(block_length: int, steps: int) -> list[int]:
    """``num_transfer[s] = B // steps + (1 if s < B % steps else 0)``: the remainder goes to the early steps."""
    base, rem = divmod(block_length, steps)
    return [base + (1 if s < rem else 0) for s in range(steps)]


def top_confident(conf: np.ndarray, n: int) -> np.ndarray:
    """Boolean mask of the ``n`` largest finite entries of ``conf`` (ties: lower position first)."""
    order = np.argsort(-conf, kind="stable")[:n]  # [n]
    sel = np.zeros(conf.shape, dtype=bool)
    sel[order[np.isfinite(conf[order])]] = True
    return sel


def threshold_m2t(p: np.ndarray, act: np.ndarray, threshold: float, minimum: int) -> np.ndarray:
    """Masks with ``p > threshold`` (strict) if at least ``minimum`` pass, else the ``minimum`` most confident."""
    conf = np.where(act, p, -np.inf)  # [L]
    hi = (conf > threshold) & act  # [L]
    if hi.sum() >= minimum:
        return hi
    return top_confident(conf, min(minimum, int(act.sum())))


class ThresholdPolicy:
    """LLaDA2.0: threshold with the transfer-schedule fallback; at most ``steps`` forwards per block."""

    edits = False

    def __init__(self, *, threshold: float, block_length: int, steps: int) -> None:
        self.threshold = threshold
        self.schedule = transfer_schedule(block_length, steps)
        self.s = 0

    def begin_block(self) -> None:
        self.s = 0

    def proceed(self, n_masks: int) -> bool:
        return n_masks > 0 and self.s < len(self.schedule)

    def select(self, x0: np.ndarray, p: np.ndarray, act: np.ndarray, editable: np.ndarray,
               old: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        m2t = threshold_m2t(p, act, self.threshold, self.schedule[self.s])
        self.s += 1
        return m2t, np.zeros_like(m2t)

    def block_done(self, had_masks: bool, edited: bool) -> bool:
        return False  # proceed() ends the block once no masks are left
