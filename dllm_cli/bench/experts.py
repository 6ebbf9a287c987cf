"""The routed experts a decode really used, read from llama.cpp through the context's ``cb_eval`` callback.

llama.cpp names the top-k expert ids of layer ``il`` ``ffn_moe_topk-<il>`` (``build_moe_ffn``): an I32 view
``[n_expert_used, n_tokens]`` of the router's argsort (non-contiguous: row stride ``n_expert`` ids). The
callback asks the scheduler for exactly those tensors, so only this instrumented pass pays for the extra
graph splits; timed passes run on a context without it.
"""
from __future__ import annotations

import ctypes
from typing import Any

import numpy as np

PREFIX = b"ffn_moe_topk-"


class _TensorHead(ctypes.Structure):
    # the leading fields of struct ggml_tensor (ggml.h): type, buffer, ne[4], nb[4]
    _fields_ = [("type", ctypes.c_int32), ("buffer", ctypes.c_void_p),
                ("ne", ctypes.c_int64 * 4), ("nb", ctypes.c_size_t * 4)]


class ExpertProbe:
    """Collects ``{layer: ids [n_tokens, k]}`` for every decode of a ``Session(eval_callback=probe.callback)``."""

    def __init__(self, rt: Any) -> None:
        names = sorted((rt.path / "lib").glob("libggml-base.so*")) + sorted((rt.path / "lib").glob("libggml-base*.dylib"))
        g = ctypes.CDLL(str(names[0])) if names else rt.cdll
        g.ggml_get_name.restype, g.ggml_get_name.argtypes = ctypes.c_char_p, [ctypes.c_void_p]
        g.ggml_nbytes.restype, g.ggml_nbytes.argtypes = ctypes.c_size_t, [ctypes.c_void_p]
        g.ggml_backend_tensor_get.restype = None
        g.ggml_backend_tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
        self._g = g
        self.layers: dict[int, np.ndarray] = {}
        self.callback = rt.lib.ggml_backend_sched_eval_callback(self._cb)

    def _cb(self, t: int, ask: bool, _user: Any) -> bool:
        name = self._g.ggml_get_name(t) or b""
        if not name.startswith(PREFIX):
            return False if ask else True
        if ask:
            return True
        head = _TensorHead.from_address(t)
        k, n = int(head.ne[0]), int(head.ne[1])
        size = int(self._g.ggml_nbytes(t))
        buf = np.empty(size // 4 + 1, np.int32)
        self._g.ggml_backend_tensor_get(t, buf.ctypes.data, 0, size)
        ids = np.lib.stride_tricks.as_strided(buf, shape=(n, k), strides=(int(head.nb[1]), int(head.nb[0])))
        self.layers[int(name[len(PREFIX):])] = ids.copy()  # [n_tokens, k]
        return True

    def clear(self) -> None:
        self.layers = {}

    def union_sizes(self) -> dict[int, int]:
        """Per MoE layer: distinct experts routed to by any token of the last decode(s)."""
        return {il: int(np.unique(ids).size) for il, ids in sorted(self.layers.items())}
