"""A llama.cpp context over a ``Model``: the ``StepModel`` the decoding engine drives.

Discipline (runtime-notes "API recipe"): one sequence; committed blocks keep their K/V; a step decodes
the active block against the cache and removes its cells again; a commit is one more kept decode.
Every llama.cpp precondition that would abort the process is checked here first and raised as a
``DllmError`` (non-causal ``n_ubatch >= n_tokens``, ``n_batch``, context capacity, token and position
ranges, output-row count).
"""
from __future__ import annotations

import ctypes
from typing import Any, Self, Sequence

import numpy as np

from dllm_cli.decoding.stepper import StepOutput, WantLogits, top2_from_logits
from dllm_cli.errors import ContextFullError, DecodeError, ModelError, UsageError
from dllm_cli.runtime import bindings
from dllm_cli.runtime.model import Model
from dllm_cli.runtime.options import KV_TYPES, RuntimeOptions
from dllm_cli import signals

_FLASH = {None: -1, False: 0, True: 1}  # llama_flash_attn_type: auto, disabled, enabled


def resolve_flash_attn(opts: RuntimeOptions, backend: str) -> bool | None:
    """What ``--flash-attn auto`` means: on for a q8_0 KV cache (it needs it), off on the CPU backend (ggml's CPU
    kernel takes a row-by-row path below 64 query rows, slower than the plain path for 32-token steps at long
    prefixes; docs/PERFORMANCE.md "Default runtime path"), else llama.cpp's own auto (None)."""
    if opts.flash_attn is not None:
        return opts.flash_attn
    if opts.kv_type == "q8_0":
        return True
    return False if backend == "cpu" and not opts.rpc else None


def widen_rows(rows: list[int], n_tokens: int) -> tuple[list[int], list[int]]:
    """The output rows to decode for the sorted ``rows``, and where ``rows`` sit among them.

    A lone output row is decoded with a neighbour: ggml multiplies a single row by the output head with its
    matrix-vector kernel and two or more with its matrix-matrix kernel, which sums in another order (5e-7 apart
    in f32). With never fewer than two rows a request's logits do not depend on how many rows other requests
    add to a batched decode (``runtime.batch``), so a batched answer is bit-identical to the answer alone."""
    if len(rows) != 1 or n_tokens < 2:
        return rows, list(range(len(rows)))
    r = rows[0]
    return ([r, r + 1], [0]) if r + 1 < n_tokens else ([r - 1, r], [1])


def sort_rows(rows: Sequence[int]) -> tuple[list[int], np.ndarray | None]:
    """``rows`` in ascending order (the order llama.cpp returns output rows in), and the permutation that puts
    results for the sorted rows back in the caller's order (None when ``rows`` already ascend)."""
    order = sorted(range(len(rows)), key=lambda i: rows[i])
    return [int(rows[i]) for i in order], (None if order == list(range(len(order))) else np.argsort(order))


class _RawRows:
    """``__array_interface__`` of ``n_rows x n_vocab`` float32 at ``addr``: numpy reads it without copying."""

    __slots__ = ("__array_interface__",)

    def __init__(self, addr: int, n_rows: int, n_vocab: int) -> None:
        self.__array_interface__ = {"data": (addr, True), "shape": (n_rows, n_vocab), "typestr": "<f4",
                                    "version": 3}


def raw_logits(lib: Any, ctx: Any, n_rows: int, n_vocab: int) -> np.ndarray:
    """The last decode's output logits ``[n_rows, n_vocab]`` float32 as a read-only view of llama.cpp's buffer.

    The view is valid until the context's next decode (which may overwrite or reallocate the buffer) or its
    free: copy it to keep it. ``n_rows`` must not exceed the decode's output rows."""
    addr = ctypes.cast(lib.llama_get_logits(ctx), ctypes.c_void_p).value
    if not addr:
        raise DecodeError("llama.cpp returned no logits for the last decode", "run with DLLM_DEBUG=1")
    return np.asarray(_RawRows(addr, n_rows, n_vocab))


class OwnedContext:
    """The lifetime of a llama.cpp context and its batch (``ctx``, ``batch``, ``lib``): freed once by ``close`` or
    the ``with`` block, best effort by ``__del__``."""

    lib: Any
    ctx: Any
    batch: Any

    def close(self) -> None:
        """Free the context once; a signal arriving meanwhile waits until it is freed (``signals.deferred``)."""
        with signals.deferred():
            self._release()

    def _release(self) -> None:
        # the pointer is cleared before the free: an interrupt between the two leaks at exit, never frees twice
        ctx, self.ctx = getattr(self, "ctx", None), None
        if ctx:
            self.lib.llama_batch_free(self.batch)
            self.lib.llama_free(ctx)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # no deferred region here: an exception raised in __del__ is swallowed
        try:
            self._release()
        except Exception:
            pass


class Session(OwnedContext):
    """One decoding context. ``cached`` are the committed token ids at positions 0..len-1."""

    def __init__(self, model: Model, options: RuntimeOptions | None = None, *, device_confidence: bool = True,
                 eval_callback: Any = None) -> None:
        self.model = model
        self.options = opts = options or model.options
        self.lib = lib = model.rt.lib
        self.n_vocab = model.n_vocab
        self.mask_id = model.mask_id
        self.eos_id = model.eos_id
        self.edit_ids = model.edit_ids
        self.block_length = model.block_length
        if opts.kv_type == "q8_0" and model.info.head_dim % 32:  # q8_0 blocks of 32 must tile every cache row
            raise UsageError(f"--kv-type q8_0 needs a head dimension that is a multiple of 32; "
                             f"{model.path.name} has {model.info.head_dim}", "use --kv-type f16 or --kv-type f32")
        B = self.block_length
        self.n_ctx = -(-opts.ctx_size // B) * B
        self.n_ubatch = max(B, (min(opts.ubatch, self.n_ctx) // B) * B)
        flash = opts.flash_attn
        if opts.kv_type == "q8_0" and flash is False:
            raise DecodeError("a q8_0 KV cache needs flash attention", "use --flash-attn on or auto, or --kv-type f16")
        p = lib.llama_context_default_params()
        p.n_ctx, p.n_batch, p.n_ubatch, p.n_seq_max = self.n_ctx, self.n_ubatch, self.n_ubatch, 1
        p.n_threads = p.n_threads_batch = opts.n_threads
        p.type_k = p.type_v = KV_TYPES[opts.kv_type]
        p.flash_attn_type = _FLASH[resolve_flash_attn(opts, model.rt.backend)]
        p.no_perf = True
        if eval_callback is not None:  # a ggml_backend_sched_eval_callback (bench's instrumented pass)
            p.cb_eval = eval_callback
            self._eval_callback = eval_callback  # keep the ctypes thunk alive as long as the context
        self.ctx = lib.llama_init_from_model(model.ptr, p)
        if not self.ctx:
            raise DecodeError(f"llama.cpp could not create a context of {self.n_ctx} tokens",
                              "lower --ctx-size or free memory")
        self.mem = lib.llama_get_memory(self.ctx)
        self.batch = lib.llama_batch_init(self.n_ubatch, 0, 1)
        self.cached: list[int] = []
        self.device_confidence = device_confidence and bindings.has_confidence(model.rt)
        self._conf_mode: tuple | None = None
        self._attn_block = B
        self.forwards = 0

    # --- guarded decode ------------------------------------------------------------------
    def _check(self, tokens: Sequence[int], start: int) -> None:
        n = len(tokens)
        if n == 0:
            raise DecodeError("empty decode")
        if start != len(self.cached):
            raise DecodeError(f"decode at position {start} but {len(self.cached)} positions are committed")
        if start + n > self.n_ctx:
            raise ContextFullError(f"the context is full ({start + n} > {self.n_ctx} tokens)",
                                   "raise --ctx-size or start a new conversation")
        if n > self.n_ubatch:  # llama.cpp aborts: non-causal attention requires n_ubatch >= n_tokens
            raise DecodeError(f"decode of {n} tokens exceeds n_ubatch {self.n_ubatch}")
        bad = [t for t in tokens if not 0 <= int(t) < self.n_vocab]
        if bad:
            raise DecodeError(f"token id {bad[0]} is outside the vocabulary (0..{self.n_vocab - 1})")

    def _decode(self, tokens: Sequence[int], start: int, rows: Sequence[int]) -> None:
        self._check(tokens, start)
        b = self.batch
        out = set(rows)
        for i, t in enumerate(tokens):
            b.token[i] = int(t)
            b.pos[i] = start + i
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = 0
            b.logits[i] = i in out
        b.n_tokens = len(tokens)
        rc = self.lib.llama_decode(self.ctx, b)
        self.forwards += 1
        if rc != 0:
            self.lib.llama_memory_seq_rm(self.mem, 0, start, -1)
            raise DecodeError(f"llama_decode failed with code {rc}",
                              "the context may be full: raise --ctx-size" if rc == 1 else "run with DLLM_DEBUG=1")

    def _set_attn_block(self, block: int) -> None:
        if block != self._attn_block:
            bindings.set_attn_block(self.model.rt, self.ctx, block)
            self._attn_block = block

    # --- StepModel ---------------------------------------------------------------------------
    def commit(self, tokens: Sequence[int], start: int) -> None:
        """Decode ``tokens`` at ``start..`` and keep their K/V (chunked at block-aligned ubatch size)."""
        self._set_attn_block(self.block_length)
        step = self.n_ubatch
        for i in range(0, len(tokens), step):
            chunk = list(tokens[i:i + step])
            self._decode(chunk, start + i, ())
            self.cached.extend(int(t) for t in chunk)

    def step(self, tokens: Sequence[int], start: int, rows: Sequence[int], want_logits: WantLogits = False,
             attn_block: int | None = None) -> StepOutput:
        """Decode the active block(s) against the cache, read the rows, then drop the block's cells.

        ``want_logits="view"`` returns the logits as a read-only view of llama.cpp's output buffer (no copy of
        ``[n, V]`` floats; valid until this session's next decode, ``stepper.WantLogits``); ``True`` a copy."""
        rows = list(rows)
        srows, inv = sort_rows(rows)
        if any(not 0 <= r < len(tokens) for r in srows) or len(set(srows)) != len(srows):
            raise DecodeError(f"output rows {rows} do not fit a block of {len(tokens)} tokens")
        keep = bool(want_logits)  # True and "view" both need llama.cpp's copy of the logits to its host buffer
        use_device = self.device_confidence and not keep
        if self.device_confidence:
            mode = (True, self.mask_id, keep)
            if mode != self._conf_mode:
                bindings.set_confidence(self.model.rt, self.ctx, True, self.mask_id, keep)
                self._conf_mode = mode
        self._set_attn_block(self.block_length if attn_block is None else attn_block)
        drows, pick = widen_rows(srows, len(tokens))
        try:
            self._decode(tokens, start, drows)
            logits = None
            if srows and (want_logits or not use_device):
                logits = raw_logits(self.lib, self.ctx, len(drows), self.n_vocab)  # a view: copied below if kept
                if len(pick) != len(drows):
                    logits = logits[pick]  # [n, V], a copy without the widening neighbour
            if srows and self.device_confidence:
                ids, probs = bindings.get_confidence(self.model.rt, self.ctx, len(drows))
                ids, probs = ids[pick], probs[pick]
            elif srows:
                assert logits is not None  # read above: without device confidence use_device is False
                host = top2_from_logits(logits, self.mask_id, dtype=np.float32)
                ids, probs = host.ids, host.probs
            else:
                ids, probs = np.zeros((0, 2), np.int32), np.zeros((0, 2), np.float32)
        finally:
            self.lib.llama_memory_seq_rm(self.mem, 0, start, -1)
        self._check_finite(ids, probs)
        if not want_logits:
            logits = None
        if inv is not None:  # rows came unsorted: back to the caller's order (fancy indexing copies)
            ids, probs, logits = ids[inv], probs[inv], None if logits is None else logits[inv]
        elif logits is not None and want_logits != "view" and not logits.flags.owndata:
            logits = logits.copy()  # the one copy a kept result needs; a view is left to the next decode
        if logits is not None and want_logits == "view":
            logits.flags.writeable = False  # a lent result is read-only, view or (unsorted, lone row) copy
        return StepOutput(ids=ids, probs=probs, logits=logits)

    def _check_finite(self, ids: np.ndarray, probs: np.ndarray) -> None:
        """NaN/inf logits (damaged or overflowing weights) surface as NaN probabilities or a -1 token id."""
        if not np.isfinite(probs).all() or ((ids < 0) | (ids >= self.n_vocab)).any():
            raise ModelError(f"{self.model.path} produced non-finite logits (NaN or inf)",
                             "its weights are damaged or overflow at this precision: re-convert it (f32/bf16) "
                             "or use another quantization")

    # --- autoregressive use of the same weights (bench's AR baseline) ----------------------------
    def set_causal(self, causal: bool) -> None:
        """Switch llama.cpp's causal attention on or off (diffusion decoding needs it off, the default)."""
        self.lib.llama_set_causal_attn(self.ctx, bool(causal))

    def extend(self, tokens: Sequence[int], start: int, rows: Sequence[int] = ()) -> np.ndarray | None:
        """Decode ``tokens`` at ``start..`` and keep their K/V, returning the raw logits of ``rows`` (sorted).

        With ``set_causal(True)`` one token per call is an autoregressive decode step.
        """
        rows = sorted(rows)
        self._decode(tokens, start, rows)
        self.cached.extend(int(t) for t in tokens)
        if not rows:
            return None
        logits = raw_logits(self.lib, self.ctx, len(rows), self.n_vocab).copy()
        self._check_finite(np.zeros(0, np.int32), logits)
        return logits

    def rollback(self, pos: int) -> None:
        """Drop committed cells at positions >= pos."""
        pos = max(0, min(pos, len(self.cached)))
        self.lib.llama_memory_seq_rm(self.mem, 0, pos, -1)
        del self.cached[pos:]

    def reset(self) -> None:
        self.rollback(0)
