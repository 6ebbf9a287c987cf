"""The loaded runtime's ggml through ctypes, for op-level tests of the CPU patches (0013, 0014, 0015): build a small
graph, compute it on ggml-cpu with some threads, read the result back as numpy.

``Ggml().run(build, threads)`` gives ``build`` a ``Graph`` to make tensors and ops in; the tensors it returns are
computed and copied out. Arrays are in numpy's C order, i.e. numpy shape ``(ne2, ne1, ne0)`` for a ggml tensor
``[ne0, ne1, ne2]``. Patch switches such as ``DLLM_ROW_OPS`` are read once per process by the runtime, so the
upstream side of a comparison runs in a child: ``in_child(module, function, args, env)``.
"""
from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np

TYPES = {np.dtype(np.float32): 0, np.dtype(np.float16): 1, np.dtype(np.int32): 26}
_VP, _I64, _CI, _CF = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
_SIGNATURES = {  # name: (restype, argtypes) in libggml-base
    "ggml_init": (_VP, None),
    "ggml_free": (None, [_VP]),
    "ggml_new_tensor_3d": (_VP, [_VP, _CI, _I64, _I64, _I64]),
    "ggml_get_data": (_VP, [_VP]),
    "ggml_nbytes": (ctypes.c_size_t, [_VP]),
    "ggml_is_contiguous": (ctypes.c_bool, [_VP]),
    "ggml_new_graph": (_VP, [_VP]),
    "ggml_build_forward_expand": (None, [_VP, _VP]),
    "ggml_permute": (_VP, [_VP, _VP, _CI, _CI, _CI, _CI]),
    "ggml_cont": (_VP, [_VP, _VP]),
    "ggml_mul_mat": (_VP, [_VP, _VP, _VP]),
    "ggml_soft_max": (_VP, [_VP, _VP]),
    "ggml_soft_max_ext": (_VP, [_VP, _VP, _VP, _CF, _CF]),
    "ggml_top_k": (_VP, [_VP, _VP, _CI]),
    **{f"ggml_{op}": (_VP, [_VP, _VP, _VP]) for op in ("add", "sub", "mul", "div")},
}


class _InitParams(ctypes.Structure):
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]


class Graph:
    """Tensors and ops of one ggml context (``op`` calls ``ggml_<name>`` with the context first)."""

    def __init__(self, base: Any, ctx: int) -> None:
        self.base, self.ctx = base, ctx

    def tensor(self, arr: np.ndarray) -> int:
        """A 3-d ggml tensor holding ``arr`` (f32, f16 or i32, numpy shape (ne2, ne1, ne0) or fewer dims)."""
        arr = np.ascontiguousarray(arr)
        shape = (1,) * (3 - arr.ndim) + arr.shape
        t = self.base.ggml_new_tensor_3d(self.ctx, TYPES[arr.dtype], *shape[::-1])
        ctypes.memmove(self.base.ggml_get_data(t), arr.ctypes.data, arr.nbytes)
        return t

    def op(self, name: str, *args: Any) -> int:
        return getattr(self.base, f"ggml_{name}")(self.ctx, *args)


class Ggml:
    """libggml-base and libggml-cpu of the runtime ``dllm_cli.runtime.library.load()`` finds (or of ``lib``)."""

    def __init__(self, lib: Path | None = None) -> None:
        """``lib``: another runtime's ``lib/`` directory (benchmarks compare builds)."""
        if lib is None:
            from dllm_cli.runtime.library import load

            lib = load().path / "lib"
        self.base = ctypes.CDLL(str(sorted(lib.glob("libggml-base.so*"))[0]))
        self.cpu = ctypes.CDLL(str(sorted(lib.glob("libggml-cpu.so*"))[0]))
        for name, (res, args) in _SIGNATURES.items():
            fn = getattr(self.base, name)
            fn.restype = res
            fn.argtypes = args if args is not None else [_InitParams]
        self.cpu.ggml_graph_compute_with_ctx.restype = ctypes.c_int
        self.cpu.ggml_graph_compute_with_ctx.argtypes = [_VP, _VP, ctypes.c_int]

    def run(self, build: Callable[[Graph], dict[str, tuple[int, tuple[int, ...], Any]]], threads: int = 2,
            mem: int = 256 << 20) -> dict[str, np.ndarray]:
        """Compute the outputs ``build(graph)`` returns as ``{name: (tensor, numpy shape, dtype)}``."""
        ctx = self.base.ggml_init(_InitParams(mem, None, False))
        assert ctx
        try:
            outs = build(Graph(self.base, ctx))
            gf = self.base.ggml_new_graph(ctx)
            for t, _, _ in outs.values():
                self.base.ggml_build_forward_expand(gf, t)
            assert self.cpu.ggml_graph_compute_with_ctx(ctx, gf, threads) == 0
            res = {}
            for name, (t, shape, dtype) in outs.items():
                arr = np.empty(shape, dtype)
                assert arr.nbytes == self.base.ggml_nbytes(t)
                ctypes.memmove(arr.ctypes.data, self.base.ggml_get_data(t), arr.nbytes)
                res[name] = arr
            return res
        finally:
            self.base.ggml_free(ctx)


def in_child(module: str, function: str, args: list[Any], env: dict[str, str], out: Path) -> dict[str, np.ndarray]:
    """``tests/<module>.py``'s ``function(*args)`` (a dict of arrays) run in a child process with ``env`` added."""
    code = ("import sys, json, importlib, numpy as np; sys.path.insert(0, sys.argv[1]); "
            "f = getattr(importlib.import_module(sys.argv[2]), sys.argv[3]); "
            "np.savez(sys.argv[5], **f(*json.loads(sys.argv[4])))")
    res = subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent), module, function, json.dumps(args),
                          str(out)], env=dict(os.environ, **env), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    with np.load(out) as z:
        return dict(z)
