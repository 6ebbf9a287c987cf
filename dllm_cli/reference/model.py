"""``RefModel`` (weights + config + forward) and ``KVCache`` with the block-diffusion semantics of spec §3.11."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import numpy as np
from numpy.typing import ArrayLike, DTypeLike

from dllm_cli.errors import UsageError
from dllm_cli.reference.config import RefConfig
from dllm_cli.reference.forward import Route, block_causal_mask, causal_mask, forward


@dataclass
class KVCache:
    """Per layer K and V ``[n, Hkv, D]`` (after qk-norm and RoPE) and the absolute positions ``[n]`` of the entries."""

    k: list[np.ndarray]
    v: list[np.ndarray]
    positions: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    @classmethod
    def empty(cls, cfg: RefConfig, dtype: DTypeLike = np.float64) -> "KVCache":
        shape = (0, cfg.n_head_kv, cfg.head_dim)
        return cls([np.zeros(shape, dtype) for _ in range(cfg.n_layer)],
                   [np.zeros(shape, dtype) for _ in range(cfg.n_layer)])

    @property
    def n_past(self) -> int:
        """Number of cached positions (the next default position when positions are contiguous from 0)."""
        return int(self.positions.shape[0])

    def rollback(self, pos: int) -> None:
        """Drop every entry whose position is >= ``pos``."""
        keep = self.positions < pos  # [n]
        self.k = [k[keep] for k in self.k]
        self.v = [v[keep] for v in self.v]
        self.positions = self.positions[keep]

    def copy(self) -> "KVCache":
        return KVCache([k.copy() for k in self.k], [v.copy() for v in self.v], self.positions.copy())

    def append(self, k: list[np.ndarray], v: list[np.ndarray], positions: np.ndarray) -> None:
        self.k = [np.concatenate([a, b]) for a, b in zip(self.k, k)]
        self.v = [np.concatenate([a, b]) for a, b in zip(self.v, v)]
        self.positions = np.concatenate([self.positions, np.asarray(positions, dtype=np.int64)])


MaskSpec = np.ndarray | str | None


class RefModel:
    """A loaded LLaDA2 model: ``cfg``, ``weights`` (GGUF names, numpy [out, in]) and the dtype of both."""

    def __init__(self, cfg: RefConfig, weights: Mapping[str, np.ndarray], dtype: DTypeLike = np.float64) -> None:
        self.cfg = cfg
        self.dtype = np.dtype(dtype)
        self.weights = {n: np.asarray(w, dtype=self.dtype) for n, w in weights.items()}
        self.last_routes: list[Route | None] = []

    def new_cache(self) -> KVCache:
        return KVCache.empty(self.cfg, self.dtype)

    def mask_for(self, mask: MaskSpec, q_pos: np.ndarray, k_pos: np.ndarray) -> np.ndarray:
        """Resolve ``mask`` (None = block-causal, "full", "causal", or an additive [S, S_kv] array)."""
        if mask is None:
            return block_causal_mask(q_pos, k_pos, self.cfg.block_length)  # [S, T]
        if isinstance(mask, str):
            if mask == "full":
                return np.zeros((q_pos.shape[0], k_pos.shape[0]))  # [S, T]
            if mask == "causal":
                return causal_mask(q_pos, k_pos)  # [S, T]
            raise UsageError(f"unknown mask {mask!r}", "use None (block-causal), 'full', 'causal' or an array")
        mask = np.asarray(mask)
        if mask.shape != (q_pos.shape[0], k_pos.shape[0]):
            raise UsageError(f"mask shape {mask.shape} != (S, S_kv) = {(q_pos.shape[0], k_pos.shape[0])}")
        return mask

    def forward(self, ids: ArrayLike, positions: ArrayLike | None = None, *, cache: KVCache | None = None, mask: MaskSpec = None,
                commit: bool = False) -> np.ndarray:
        """Logits ``[S, V]`` (model dtype) for ``ids`` attending over [cached K/V ‖ new K/V].

        ``positions`` defaults to ``cache.n_past + arange(S)``. With ``commit=True`` the new K/V are
        appended to ``cache``; otherwise the cache is left unchanged. The routing of every layer of
        this call is kept in ``self.last_routes`` (None for dense layers).
        """
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)  # [S]
        n_past = cache.n_past if cache is not None else 0
        pos = (n_past + np.arange(ids.shape[0])) if positions is None else np.asarray(positions)  # [S]
        pos = pos.astype(np.int64).reshape(-1)  # [S]
        if pos.shape != ids.shape:
            raise UsageError(f"{ids.shape[0]} ids but {pos.shape[0]} positions")
        if commit and cache is None:
            raise UsageError("commit=True needs a cache")
        past = cache if cache is not None else self.new_cache()
        k_pos = np.concatenate([past.positions, pos])  # [T]
        m = self.mask_for(mask, pos, k_pos)  # [S, T]
        logits, outs = forward(self.weights, self.cfg, ids, pos, m, list(zip(past.k, past.v)))  # [S, V]
        self.last_routes = [o.route for o in outs]
        if commit and cache is not None:  # commit without a cache was rejected above
            cache.append([o.k for o in outs], [o.v for o in outs], pos)
        return logits
