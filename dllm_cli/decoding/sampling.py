"""Per-position prediction ``(x0, p)`` from a ``StepOutput`` (spec §5.0 "Per-step prediction").

Temperature 0 is greedy and uses the runtime's top-1 and its probability (mask already excluded). Temperature
> 0 needs the raw logits: mask logit -> -inf, logits / T, top-k, top-p (the first token always kept), then a
draw from the explicit ``np.random.Generator``; ``p`` is the drawn token's probability under that filtered,
tempered distribution.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dllm_cli.decoding.stepper import StepOutput


@dataclass(frozen=True, kw_only=True)
class Sampler:
    """``sampler(out, rng, mask_id) -> (ids [n] int64, probs [n] float64)``."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    @property
    def needs_logits(self) -> bool:
        return self.temperature > 0.0

    def __call__(self, out: StepOutput, rng: np.random.Generator, mask_id: int) -> tuple[np.ndarray, np.ndarray]:
        if not self.needs_logits:
            return out.ids[:, 0].astype(np.int64), out.probs[:, 0].astype(np.float64)
        if out.logits is None:
            raise ValueError("sampling with temperature > 0 needs logits from the model step")
        probs = filtered_probs(out.logits, mask_id, temperature=self.temperature, top_k=self.top_k,
                               top_p=self.top_p)  # [n, V]
        cdf = np.cumsum(probs, axis=1)  # [n, V]
        u = rng.random(probs.shape[0]) * cdf[:, -1]  # [n]
        ids = np.minimum((cdf <= u[:, None]).sum(axis=1), probs.shape[1] - 1)  # [n]
        ids = np.where(probs[np.arange(len(ids)), ids] > 0, ids, probs.argmax(axis=1))  # never a filtered id
        return ids.astype(np.int64), probs[np.arange(len(ids)), ids]


def filtered_probs(logits: np.ndarray, mask_id: int, *, temperature: float, top_k: int = 0,
                   top_p: float = 1.0) -> np.ndarray:
    """softmax of the tempered, top-k then top-p filtered logits [n, V]; the mask token has probability 0."""
    lg = np.asarray(logits, dtype=np.float64) / temperature  # [n, V]
    lg[:, mask_id] = -np.inf
    if 0 < top_k < lg.shape[1]:
        kth = -np.partition(-lg, top_k - 1, axis=1)[:, top_k - 1 : top_k]  # [n, 1]
        lg = np.where(lg < kth, -np.inf, lg)  # ties with the k-th value are kept (as torch's filter does)
    if top_p < 1.0:
        order = np.argsort(-lg, axis=1, kind="stable")  # [n, V]
        sorted_lg = np.take_along_axis(lg, order, 1)  # [n, V]
        cum = np.cumsum(_softmax(sorted_lg), axis=1)  # [n, V]
        drop = np.zeros_like(cum, dtype=bool)
        drop[:, 1:] = cum[:, :-1] > top_p  # shift right: keep the token that crosses top_p, always the first
        np.put_along_axis(lg, order, np.where(drop, -np.inf, sorted_lg), 1)
    return _softmax(lg)


def _softmax(lg: np.ndarray) -> np.ndarray:
    e = np.exp(lg - lg.max(axis=1, keepdims=True))  # [n, V]
    return e / e.sum(axis=1, keepdims=True)


def make_sampler(*, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0) -> Sampler:
    """Greedy for temperature 0, else tempered top-k/top-p sampling."""
    return Sampler(temperature=temperature, top_k=top_k, top_p=top_p)
