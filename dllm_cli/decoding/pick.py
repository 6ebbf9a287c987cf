"""The best allowed token of a row, greedy, without a pass over the whole vocabulary (the constrained hot path).

The confidence head already gives each row's top-2 ids and their probabilities over the vocabulary (mask
excluded), so ``lse = logit[top1] - log p1`` is the row's log-partition. Under a constraint, with ``A`` the
allowed tokens:

* the best allowed token is top-1 if allowed, else top-2 if allowed, else the argmax of the logits over ``A``;
* its confidence is ``exp(logit - lse) / Z`` with ``Z = sum over A of exp(logit - lse)`` (the renormalised
  probability), summed over ``A`` when ``A`` is at most half the vocabulary and as ``1 - (the rest)`` otherwise;
  when that difference is small (``Z < MIN_COMPLEMENT``) it is summed over ``A`` directly, to avoid cancellation.

Allowed sets are unions of automaton token classes; ``ClassIndex`` keeps the token ids of each class and caches
the id list of each allowed-class pattern (patterns repeat across rows and steps).
"""
from __future__ import annotations

import math

import numpy as np

MIN_COMPLEMENT = 1e-3
MAX_PATTERNS = 4096


class ClassIndex:
    """Token ids by automaton class (CSR over ``token_class`` [V]) and the id lists of allowed-class patterns."""

    def __init__(self, token_class: np.ndarray, n_classes: int) -> None:
        self.token_class = token_class
        self.order = np.argsort(token_class, kind="stable").astype(np.int64)  # [V]
        self.size = np.bincount(token_class, minlength=n_classes)  # [C]
        self.offsets = np.concatenate([[0], np.cumsum(self.size)])  # [C + 1]
        self.n_vocab = len(token_class)
        self._patterns: dict[bytes, tuple[np.ndarray, bool]] = {}

    def ids(self, allowed: np.ndarray) -> tuple[np.ndarray, bool]:
        """``(ids, inside)``: the allowed ids when they are at most half the vocabulary, else the others."""
        key = allowed.tobytes()
        got = self._patterns.get(key)
        if got is None:
            inside = int(self.size[allowed].sum()) <= self.n_vocab // 2
            cls = np.flatnonzero(allowed if inside else ~allowed)
            parts = [self.order[self.offsets[c]:self.offsets[c + 1]] for c in cls.tolist()]
            ids = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
            if len(self._patterns) >= MAX_PATTERNS:
                self._patterns.clear()
            got = self._patterns[key] = (ids, inside)
        return got


def greedy(logits: np.ndarray, allowed: np.ndarray, index: ClassIndex, head_ids: np.ndarray,
           head_p: np.ndarray, mask_id: int) -> tuple[int, float]:
    """``(id, renormalised probability)`` of the best allowed token of one row.

    ``logits`` [V] raw, ``allowed`` [C] bool (non-empty; the mask's class is never allowed), ``head_ids`` /
    ``head_p`` [2]: the row's unconstrained top-2 and their probabilities (mask excluded).
    """
    cls = index.token_class
    t1, t2 = int(head_ids[0]), int(head_ids[1])
    lse = float(logits[t1]) - math.log(max(float(head_p[0]), 1e-38))
    ids, inside = index.ids(allowed)
    if inside:
        z = _sum_exp(logits, ids, lse)
    else:
        z = 1.0 - (_sum_exp(logits, ids, lse) - math.exp(float(logits[mask_id]) - lse))
        if z < MIN_COMPLEMENT:
            z = _sum_exp(logits, np.flatnonzero(allowed[cls]), lse)
    if allowed[cls[t1]]:
        best = t1
    elif allowed[cls[t2]]:
        best = t2
    elif inside:
        best = int(ids[int(np.argmax(logits[ids]))])
    else:
        row = np.array(logits, dtype=np.float32)
        row[ids] = -np.inf
        best = int(np.argmax(row))
    return best, math.exp(float(logits[best]) - lse) / z


def _sum_exp(logits: np.ndarray, ids: np.ndarray, lse: float) -> float:
    """``sum(exp(logits[ids] - lse))`` in float64, in place on one gathered copy (``logits`` [V] float32)."""
    x = logits.take(ids).astype(np.float64)  # [m]
    x -= lse
    np.exp(x, out=x)
    return float(x.sum())
