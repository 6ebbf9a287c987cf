"""The step interface the decoder drives (``StepModel``), plus two implementations that need no runtime.

``dllm_cli.runtime`` implements ``StepModel`` over the patched llama.cpp. Here: ``ReferenceModel`` adapts the
numpy reference forward (``dllm_cli.reference.RefModel``), and ``ScriptedModel`` replays predefined outputs
for tests while recording every call and checking the KV discipline of spec §3.11.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Protocol, Sequence, runtime_checkable

import numpy as np


WantLogits = bool | Literal["view"]
"""``step``'s ``want_logits``: False (top-2 only), True (the rows' raw logits, the caller's to keep), or "view":
logits the caller reads before the model's next decode and does not write (the runtime then hands out a
read-only view of llama.cpp's output buffer instead of copying ``[n, V]`` floats; models without one copy)."""


@dataclass(frozen=True)
class StepOutput:
    """Per requested row: top-1/top-2 ids and probabilities (mask excluded, renormalised), raw logits if asked."""

    ids: np.ndarray  # [n_rows, 2] int32 (top1, top2)
    probs: np.ndarray  # [n_rows, 2] float32
    logits: np.ndarray | None = None  # [n_rows, n_vocab] float32, raw (mask not excluded); "view": see WantLogits


@runtime_checkable
class StepModel(Protocol):
    """A block-causal diffusion LM with a committed KV prefix (positions ``0 .. len(cached)-1``)."""

    n_vocab: int
    mask_id: int
    eos_id: int
    block_length: int
    n_ctx: int

    @property
    def cached(self) -> list[int]:
        """Token ids whose K/V are committed, position i at index i (the engine reads it, never rebinds it)."""

    def commit(self, tokens: Sequence[int], start: int) -> None:
        """Decode ``tokens`` at positions ``start..`` (== len(cached)) block-causally and keep their K/V."""

    def step(self, tokens: Sequence[int], start: int, rows: Sequence[int], want_logits: WantLogits = False,
             attn_block: int | None = None) -> StepOutput:
        """Decode ``tokens`` at ``start..`` (== len(cached)) against the cache; K/V discarded afterwards.

        ``attn_block`` overrides the attention block size for this decode (0 = all of ``tokens`` see each
        other); the engine passes it only for multi-block editing.
        """

    def rollback(self, pos: int) -> None:
        """Drop committed cells at positions >= ``pos``."""


def top2_from_logits(logits: np.ndarray, mask_id: int, want_logits: WantLogits = False,
                     dtype: type = np.float64) -> StepOutput:
    """Top-2 ids and full-vocabulary probabilities of ``logits`` [n, V] with the mask token excluded (its logit
    set to -inf), computed in ``dtype``. Ties go to the lowest id. Also the runtime's host path when the
    on-device confidence head is off (there with ``dtype=np.float32``)."""
    e: np.ndarray = np.array(logits, dtype=dtype, copy=True)  # [n, V]
    if 0 <= mask_id < e.shape[1]:
        e[:, mask_id] = -np.inf
    e -= e.max(axis=1, keepdims=True)
    np.exp(e, out=e)  # [n, V] unnormalised probabilities
    z = e.sum(axis=1)  # [n]
    rows = np.arange(e.shape[0])
    i1 = np.argmax(e, axis=1)  # [n]
    p1 = e[rows, i1] / z
    e[rows, i1] = -1.0
    i2 = np.argmax(e, axis=1)  # [n]
    p2 = e[rows, i2] / z
    return StepOutput(ids=np.stack([i1, i2], 1).astype(np.int32), probs=np.stack([p1, p2], 1).astype(np.float32),
                      logits=np.asarray(logits, dtype=np.float32) if want_logits else None)


Frame = tuple[Sequence[int], Sequence[float]] | np.ndarray
Script = Sequence[Frame] | Callable[[int, list[int], int], Frame]


@dataclass
class ScriptedModel:
    """Replays ``script`` (one frame per ``step`` call) and records every call.

    A frame covers all of the call's tokens: either ``(top1_ids, probs)`` (used verbatim, float32) or a logits
    array ``[len(tokens), V]`` (reduced with ``top2_from_logits``). ``script`` may also be a callable
    ``(call_no, tokens, start) -> frame``. ``cached`` holds the committed tokens; ``step`` and ``commit``
    assert ``start == len(cached)``, and ``stale_checks`` lets tests compare the cache with the canvas.
    """

    script: Script
    n_vocab: int = 16
    mask_id: int = 15
    eos_id: int = 14
    block_length: int = 4
    n_ctx: int = 1024
    edit_ids: tuple[int, int] | None = None  # LLaDA2.2 (DELETE, SPLIT) ids
    cached: list[int] = field(default_factory=list)
    calls: list[dict[str, Any]] = field(default_factory=list)
    commits: list[tuple[tuple[int, ...], int]] = field(default_factory=list)
    rollbacks: list[int] = field(default_factory=list)
    n_steps: int = 0

    def _frame(self, tokens: list[int], start: int) -> Frame:
        if callable(self.script):
            return self.script(self.n_steps, tokens, start)
        if self.n_steps >= len(self.script):
            raise AssertionError(f"script exhausted after {self.n_steps} step calls")
        return self.script[self.n_steps]

    def step(self, tokens: Sequence[int], start: int, rows: Sequence[int], want_logits: WantLogits = False,
             attn_block: int | None = None) -> StepOutput:
        tokens, rows = [int(t) for t in tokens], [int(r) for r in rows]
        assert start == len(self.cached), f"step at {start} but {len(self.cached)} cells committed"
        self.calls.append({"tokens": tuple(tokens), "start": start, "rows": tuple(rows),
                           "want_logits": want_logits, "attn_block": attn_block})
        frame = self._frame(tokens, start)
        self.n_steps += 1
        if isinstance(frame, np.ndarray):
            assert frame.shape == (len(tokens), self.n_vocab), f"frame shape {frame.shape}"
            return top2_from_logits(frame[rows], self.mask_id, want_logits)
        assert not want_logits, "logits requested but the script frame has only (ids, probs)"
        ids = np.asarray(frame[0], dtype=np.int32)[rows]  # [n]
        probs = np.asarray(frame[1], dtype=np.float32)[rows]  # [n]
        second = (ids + 1) % self.n_vocab
        second = np.where(second == self.mask_id, (second + 1) % self.n_vocab, second)
        return StepOutput(ids=np.stack([ids, second], 1).astype(np.int32),
                          probs=np.stack([probs, np.zeros_like(probs)], 1))

    def commit(self, tokens: Sequence[int], start: int) -> None:
        assert start == len(self.cached), f"commit at {start} but {len(self.cached)} cells committed"
        self.commits.append((tuple(int(t) for t in tokens), start))
        self.cached.extend(int(t) for t in tokens)

    def rollback(self, pos: int) -> None:
        self.rollbacks.append(pos)
        del self.cached[pos:]


class ReferenceModel:
    """``StepModel`` over the numpy reference (``dllm_cli.reference.RefModel``) with its exact KV cache."""

    def __init__(self, ref: Any, *, eos_id: int, mask_id: int | None = None, n_ctx: int = 4096,
                 block_length: int | None = None, edit_ids: tuple[int, int] | None = None) -> None:
        self.ref = ref
        self.edit_ids = edit_ids  # LLaDA2.2 (DELETE, SPLIT) ids
        self.cache = ref.new_cache()
        self.n_vocab = int(ref.cfg.n_vocab)
        self.mask_id = int(mask_id if mask_id is not None else ref.cfg.mask_id)
        self.eos_id = int(eos_id)
        self.block_length = int(block_length or ref.cfg.block_length)
        self.n_ctx = int(n_ctx)
        self.cached: list[int] = []

    def _mask(self, n: int, start: int, attn_block: int | None) -> Any:
        if attn_block is None:
            return None  # the reference default: block-causal, aligned at 0
        if attn_block == 0:
            return "full"
        from dllm_cli.reference import block_causal_mask
        q = start + np.arange(n)  # [n]
        return block_causal_mask(q, np.concatenate([self.cache.positions, q]), attn_block)  # [n, n_past + n]

    def commit(self, tokens: Sequence[int], start: int) -> None:
        assert start == len(self.cached) == self.cache.n_past
        self.ref.forward(list(tokens), cache=self.cache, commit=True)
        self.cached.extend(int(t) for t in tokens)

    def step(self, tokens: Sequence[int], start: int, rows: Sequence[int], want_logits: WantLogits = False,
             attn_block: int | None = None) -> StepOutput:
        assert start == len(self.cached) == self.cache.n_past
        logits = self.ref.forward(list(tokens), cache=self.cache, mask=self._mask(len(tokens), start, attn_block))
        return top2_from_logits(np.asarray(logits)[list(rows)], self.mask_id, want_logits)  # [n_rows, ...]

    def rollback(self, pos: int) -> None:
        self.cache.rollback(pos)
        del self.cached[pos:]
