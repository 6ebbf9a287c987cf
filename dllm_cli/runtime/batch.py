"""Several sequences in one llama.cpp context: one ``llama_decode`` carries every active request's work.

Each sequence (a serving slot) owns a llama.cpp sequence id and, because the KV cache is *not* unified
(``kv_unified = false``), its own KV stream of ``n_ctx_seq`` cells: a token can only ever attend cells of its
own stream, and the block-causal mask (patch 0002) then applies within it. LLaDA2.2's block routing (patch 0006)
pools expert scores per (first sequence id, position / block size), so a pool never spans two requests.

A decode takes a list of ``Work`` items (at most one per sequence): a *step* (the active block, whose cells
are removed again after the logits are read) or a *commit* (block-aligned tokens whose cells are kept). The
outputs come back per work item in the ``StepOutput`` form the engine uses. Per stream, llama.cpp splits the
batch into ubatches of equal token counts per sequence; every work is a whole number of blocks, so no block
is ever split across ubatches (required: the tokens of a block attend each other).

Every llama.cpp precondition that would abort the process is checked first and raised as a ``DllmError``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from dllm_cli.decoding.stepper import StepOutput, top2_from_logits
from dllm_cli.errors import ContextFullError, DecodeError, ModelError
from dllm_cli.runtime import bindings
from dllm_cli.runtime.model import Model
from dllm_cli.runtime.options import KV_TYPES, RuntimeOptions
from dllm_cli.runtime.session import _FLASH, OwnedContext, raw_logits, resolve_flash_attn, widen_rows

KV_BYTES = {"f32": 4.0, "f16": 2.0, "q8_0": 34 / 32}  # bytes per cached K or V element


@dataclass
class Work:
    """One sequence's share of a decode: ``tokens`` at positions ``start..``; ``rows`` are the output rows."""

    seq: int
    tokens: list[int]
    start: int
    keep: bool  # True: a commit (cells kept, no output rows); False: a step (cells removed after reading)
    rows: list[int] = field(default_factory=list)
    want_logits: bool = False
    attn_block: int | None = None  # None: the model's block length (0: all of ``tokens`` see each other)


def kv_bytes(model: Model, n_cells: int, kv_type: str) -> int:
    """Bytes of K and V for ``n_cells`` cached positions over all layers (``2 * n_layer * n_head_kv * head_dim``
    elements per cell)."""
    lib = model.rt.lib
    n_layer = int(lib.llama_model_n_layer(model.ptr)) - int(lib.llama_model_n_layer_nextn(model.ptr))
    per_cell = 2 * n_layer * int(lib.llama_model_n_head_kv(model.ptr)) * model.info.head_dim * KV_BYTES[kv_type]
    return int(per_cell * n_cells)


class BatchContext(OwnedContext):
    """One llama.cpp context holding ``n_seq`` independent sequences of ``n_ctx`` positions each.

    ``cached[s]`` are the committed token ids of sequence ``s``. Not thread-safe: one thread at a time (the
    serving scheduler serialises every call).
    """

    def __init__(self, model: Model, options: RuntimeOptions | None = None, *, n_seq: int,
                 device_confidence: bool = True) -> None:
        if not 1 <= n_seq <= 256:  # LLAMA_MAX_SEQ
            raise DecodeError(f"--parallel must be in 1..256, got {n_seq}")
        self.model = model
        self.options = opts = options or model.options
        self.lib = lib = model.rt.lib
        self.n_seq = n_seq
        self.n_vocab, self.mask_id, self.block_length = model.n_vocab, model.mask_id, model.block_length
        B = self.block_length
        self.n_ctx = -(-opts.ctx_size // B) * B  # per sequence
        # every active sequence's block fits one decode, with as much again for prefill chunks
        self.n_ubatch = max((opts.ubatch // B) * B, 2 * n_seq * B)
        flash = resolve_flash_attn(opts, model.rt.backend)
        if opts.kv_type == "q8_0" and flash is False:
            raise DecodeError("a q8_0 KV cache needs flash attention", "use --flash-attn on or auto, or --kv-type f16")
        p = lib.llama_context_default_params()
        p.n_ctx, p.n_batch, p.n_ubatch = self.n_ctx * n_seq, self.n_ubatch, self.n_ubatch
        p.n_seq_max, p.kv_unified = n_seq, False  # one KV stream per sequence: no cell is shared or visible across
        p.n_threads = p.n_threads_batch = opts.n_threads
        p.type_k = p.type_v = KV_TYPES[opts.kv_type]
        p.flash_attn_type = _FLASH[flash]
        p.no_perf = True
        self.ctx = lib.llama_init_from_model(model.ptr, p)
        if not self.ctx:
            raise DecodeError(f"llama.cpp could not create a context of {n_seq} x {self.n_ctx} tokens",
                              "lower --parallel or --ctx-size, or free memory")
        self.mem = lib.llama_get_memory(self.ctx)
        self.batch = lib.llama_batch_init(self.n_ubatch, 0, 1)
        self.cached: list[list[int]] = [[] for _ in range(n_seq)]
        self.device_confidence = device_confidence and bindings.has_confidence(model.rt)
        self._conf_mode: tuple | None = None
        self._attn_block = B
        self.forwards = 0

    @property
    def kv_bytes_per_seq(self) -> int:
        """KV memory one sequence's ``n_ctx`` positions take (llama.cpp pads each stream to 256 cells)."""
        return kv_bytes(self.model, -(-self.n_ctx // 256) * 256, self.options.kv_type)

    # --- checks ----------------------------------------------------------------------------------
    def _check(self, works: Sequence[Work]) -> None:
        seqs = [w.seq for w in works]
        if not works or len(set(seqs)) != len(seqs):
            raise DecodeError(f"a decode takes at most one work per sequence, got sequences {seqs}")
        total = sum(len(w.tokens) for w in works)
        if total > self.n_ubatch:  # llama.cpp aborts: non-causal attention requires n_ubatch >= n_tokens
            raise DecodeError(f"decode of {total} tokens exceeds n_ubatch {self.n_ubatch}")
        if len({self._block_of(w) for w in works}) != 1:
            raise DecodeError("works with different attention blocks cannot share a decode")
        B = self.block_length
        for w in works:
            n = len(w.tokens)
            if not 0 <= w.seq < self.n_seq:
                raise DecodeError(f"sequence {w.seq} outside 0..{self.n_seq - 1}")
            if n == 0 or n % B or w.start % B:  # whole blocks: llama.cpp's equal split never cuts one
                raise DecodeError(f"work of {n} tokens at {w.start} is not whole blocks of {B}")
            if w.start != len(self.cached[w.seq]):
                raise DecodeError(f"decode at position {w.start} but sequence {w.seq} has "
                                  f"{len(self.cached[w.seq])} committed")
            if w.start + n > self.n_ctx:
                raise ContextFullError(f"the context is full ({w.start + n} > {self.n_ctx} tokens)",
                                       "raise --ctx-size or start a new conversation")
            if any(not 0 <= int(t) < self.n_vocab for t in w.tokens):
                raise DecodeError(f"a token id is outside the vocabulary (0..{self.n_vocab - 1})")
            if w.keep and w.rows or sorted(set(w.rows)) != list(w.rows) or any(not 0 <= r < n for r in w.rows):
                raise DecodeError(f"output rows {w.rows[:8]} do not fit a block of {n} tokens")

    def _block_of(self, w: Work) -> int:
        return self.block_length if w.keep or w.attn_block is None else w.attn_block

    # --- decode ----------------------------------------------------------------------------------
    def decode(self, works: Sequence[Work]) -> list[StepOutput | None]:
        """One ``llama_decode`` over ``works``: a ``StepOutput`` per step (rows in the work's order), None per
        commit. Steps' cells are removed afterwards; commits' cells are kept and appended to ``cached``."""
        self._check(works)
        want_logits = any(w.want_logits for w in works)
        self._configure(self._block_of(works[0]), want_logits)
        b, i = self.batch, 0
        for w in works:
            out = set(widen_rows(w.rows, len(w.tokens))[0])
            for j, t in enumerate(w.tokens):
                b.token[i], b.pos[i], b.n_seq_id[i] = int(t), w.start + j, 1
                b.seq_id[i][0] = w.seq
                b.logits[i] = j in out
                i += 1
        b.n_tokens = i
        try:
            rc = self.lib.llama_decode(self.ctx, b)
            self.forwards += 1
            if rc != 0:
                raise DecodeError(f"llama_decode failed with code {rc}",
                                  "the context may be full: raise --ctx-size" if rc == 1 else "run with DLLM_DEBUG=1")
            outs = self._read(works, want_logits)
        except BaseException:
            for w in works:
                self.lib.llama_memory_seq_rm(self.mem, w.seq, w.start, -1)
            raise
        for w in works:
            if w.keep:
                self.cached[w.seq].extend(int(t) for t in w.tokens)
            else:
                self.lib.llama_memory_seq_rm(self.mem, w.seq, w.start, -1)
        return outs

    def _configure(self, attn_block: int, want_logits: bool) -> None:
        if attn_block != self._attn_block:
            bindings.set_attn_block(self.model.rt, self.ctx, attn_block)
            self._attn_block = attn_block
        if self.device_confidence:
            mode = (True, self.mask_id, want_logits)
            if mode != self._conf_mode:
                bindings.set_confidence(self.model.rt, self.ctx, True, self.mask_id, want_logits)
                self._conf_mode = mode

    def _read(self, works: Sequence[Work], want_logits: bool) -> list[StepOutput | None]:
        """Split the decode's output rows (batch order) back per work."""
        widened = [widen_rows(w.rows, len(w.tokens)) for w in works]
        n_out = sum(len(rows) for rows, _ in widened)
        logits = ids = probs = None
        if n_out and (want_logits or not self.device_confidence):
            logits = raw_logits(self.lib, self.ctx, n_out, self.n_vocab)  # [n_out, V], a view: each work copies
        if n_out and self.device_confidence:
            ids, probs = bindings.get_confidence(self.model.rt, self.ctx, n_out)  # [n_out, 2] each
        elif n_out:
            assert logits is not None
            host = top2_from_logits(logits, self.mask_id, dtype=np.float32)
            ids, probs = host.ids, host.probs
        outs: list[StepOutput | None] = []
        r = 0
        for w, (rows, pick) in zip(works, widened):
            if w.keep:
                outs.append(None)
                continue
            n = len(rows)
            if n == 0:
                outs.append(StepOutput(np.zeros((0, 2), np.int32), np.zeros((0, 2), np.float32)))
                continue
            assert ids is not None and probs is not None
            sel = np.arange(r, r + n)[pick]  # the work's rows without a widening neighbour
            wi, wp = ids[sel], probs[sel]
            if not np.isfinite(wp).all() or ((wi < 0) | (wi >= self.n_vocab)).any():
                raise ModelError(f"{self.model.path} produced non-finite logits (NaN or inf)",
                                 "its weights are damaged or overflow at this precision: re-convert it (f32/bf16) "
                                 "or use another quantization")
            wl = logits[sel] if logits is not None and w.want_logits else None
            outs.append(StepOutput(ids=wi, probs=wp, logits=wl))
            r += n
        return outs

    def rollback(self, seq: int, pos: int) -> None:
        """Drop sequence ``seq``'s committed cells at positions >= ``pos``."""
        cached = self.cached[seq]
        pos = max(0, min(pos, len(cached)))
        self.lib.llama_memory_seq_rm(self.mem, seq, pos, -1)
        del cached[pos:]
