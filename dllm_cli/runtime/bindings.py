"""ctypes prototypes for the symbols our patches add to libllama (``ggml_patch/patches``).

They are bound on the CDLL that llama_cpp loaded (``llama_cpp.llama_cpp._lib``), once per runtime. llama-cpp-python
binds the stock API itself; everything here is ours, plus the ggml device enumeration used by ``dllm runtime info``.
"""
from __future__ import annotations

import ctypes
from functools import lru_cache
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

import numpy as np

from dllm_cli.errors import RuntimeMissingError


class Runtime(Protocol):
    """What these bindings need of a loaded runtime (``library.Runtime`` has it). A structural type, so that this
    module does not import ``library``, which imports it: the runtime package has no import cycle."""

    @property
    def lib(self) -> ModuleType: ...          # the llama_cpp module
    @property
    def cdll(self) -> ctypes.CDLL: ...        # the loaded libllama
    @property
    def path(self) -> Path: ...               # the runtime directory (``lib/`` holds the libraries)


c_ctx = ctypes.c_void_p  # struct llama_context *

_PROTOTYPES: dict[str, tuple[Any, list[Any]]] = {
    # const char * llama_dllm_version(void);
    "llama_dllm_version": (ctypes.c_char_p, []),
    # void llama_dllm_set_attn_block(struct llama_context * ctx, int32_t block);
    "llama_dllm_set_attn_block": (None, [c_ctx, ctypes.c_int32]),
    # int32_t llama_dllm_get_attn_block(const struct llama_context * ctx);
    "llama_dllm_get_attn_block": (ctypes.c_int32, [c_ctx]),
    # void llama_dllm_set_confidence(struct llama_context * ctx, bool enable, int32_t exclude_token, bool keep_logits);
    "llama_dllm_set_confidence": (None, [c_ctx, ctypes.c_bool, ctypes.c_int32, ctypes.c_bool]),
    # int32_t llama_dllm_get_confidence(struct llama_context * ctx, int32_t n_rows, int32_t * ids, float * probs);
    "llama_dllm_get_confidence": (ctypes.c_int32, [c_ctx, ctypes.c_int32, ctypes.POINTER(ctypes.c_int32),
                                                   ctypes.POINTER(ctypes.c_float)]),
}


@lru_cache(maxsize=None)
def _fn(cdll: ctypes.CDLL, name: str) -> Any:
    fn = getattr(cdll, name, None)
    if fn is None:
        return None
    fn.restype, fn.argtypes = _PROTOTYPES[name]
    return fn


def _call(rt: Runtime, name: str, *args: Any) -> Any:
    fn = _fn(rt.cdll, name)
    if fn is None:
        raise RuntimeMissingError(f"the loaded libllama has no {name}", "run `dllm runtime build`")
    return fn(*args)


def _ctx(ctx: Any) -> int:
    """Accept a raw pointer int, a c_void_p or llama_cpp's llama_context_p."""
    if isinstance(ctx, int):
        return ctx
    v = ctypes.cast(ctx, ctypes.c_void_p).value
    if not v:
        raise ValueError("null llama_context")
    return v


def version(rt: Runtime) -> str:
    raw = _call(rt, "llama_dllm_version")
    return raw.decode(errors="replace") if raw else ""


def set_attn_block(rt: Runtime, ctx: Any, block: int) -> None:
    """Block-causal mask block length for non-causal decodes (0 = fully bidirectional)."""
    _call(rt, "llama_dllm_set_attn_block", _ctx(ctx), int(block))


def get_attn_block(rt: Runtime, ctx: Any) -> int:
    return int(_call(rt, "llama_dllm_get_attn_block", _ctx(ctx)))


def has_confidence(rt: Runtime) -> bool:
    return _fn(rt.cdll, "llama_dllm_set_confidence") is not None and _fn(rt.cdll, "llama_dllm_get_confidence") is not None


def set_confidence(rt: Runtime, ctx: Any, enable: bool, exclude_token: int = -1, keep_logits: bool = True) -> None:
    """Turn the on-device confidence head on/off; ``keep_logits=False`` skips the raw-logits copy to the host."""
    _call(rt, "llama_dllm_set_confidence", _ctx(ctx), bool(enable), int(exclude_token), bool(keep_logits))


def get_confidence(rt: Runtime, ctx: Any, n_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-2 ids ``int32 [n, 2]`` and their renormalised full-vocabulary probabilities ``float32 [n, 2]``.

    Rows follow the order of ``llama_get_logits``. Raises RuntimeError if the last decode had no head output.
    """
    ids = np.empty((n_rows, 2), np.int32)
    probs = np.empty((n_rows, 2), np.float32)
    n = _call(rt, "llama_dllm_get_confidence", _ctx(ctx), int(n_rows),
              ids.ctypes.data_as(ctypes.POINTER(ctypes.c_int32)), probs.ctypes.data_as(ctypes.POINTER(ctypes.c_float)))
    if n < 0:
        raise RuntimeError("the last decode did not compute the confidence head (enable it with set_confidence)")
    return ids[:n], probs[:n]


# --- ggml device enumeration (libggml is already loaded as libllama's dependency) ----------------------------
def devices(rt: Runtime) -> list[dict[str, Any]]:
    """The ggml backend devices: name, description, type, free/total memory (empty if unavailable)."""
    libdir = rt.path / "lib"
    names = sorted(libdir.glob("libggml.so*")) + sorted(libdir.glob("libggml*.dylib")) + sorted(libdir.glob("ggml.dll"))
    if not names:
        return []
    try:
        g = ctypes.CDLL(str(names[0]))
    except OSError:
        return []
    g.ggml_backend_dev_count.restype = ctypes.c_size_t
    g.ggml_backend_dev_get.restype, g.ggml_backend_dev_get.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    for fn in ("ggml_backend_dev_name", "ggml_backend_dev_description"):
        getattr(g, fn).restype, getattr(g, fn).argtypes = ctypes.c_char_p, [ctypes.c_void_p]
    g.ggml_backend_dev_type.restype, g.ggml_backend_dev_type.argtypes = ctypes.c_int, [ctypes.c_void_p]
    g.ggml_backend_dev_memory.restype = None
    g.ggml_backend_dev_memory.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t), ctypes.POINTER(ctypes.c_size_t)]
    kinds = {0: "cpu", 1: "gpu", 2: "igpu", 3: "accel"}
    out = []
    for i in range(g.ggml_backend_dev_count()):
        d = g.ggml_backend_dev_get(i)
        free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
        g.ggml_backend_dev_memory(d, ctypes.byref(free), ctypes.byref(total))
        out.append({"name": (g.ggml_backend_dev_name(d) or b"").decode(),
                    "description": (g.ggml_backend_dev_description(d) or b"").decode(),
                    "type": kinds.get(g.ggml_backend_dev_type(d), "?"),
                    "memory_free": free.value, "memory_total": total.value})
    return out


def compiled_cpu_features(rt: Runtime) -> list[str]:
    """CPU features the loaded ggml was compiled with, as ``llama_print_system_info()`` lists them with ``= 1``
    (``AVX2``, ``AVX512_VNNI``, ``AMX_INT8``, ``REPACK``, ...): upper case, in ggml's order."""
    raw = rt.lib.llama_print_system_info()
    text = raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw or "")
    feats = []
    for part in text.split("|"):
        name, eq, value = part.rpartition("=")
        name = name.split(":")[-1].strip()  # "CPU : SSE3 = 1" -> "SSE3"
        if eq and name and value.strip() == "1" and name not in feats:
            feats.append(name)
    return feats
