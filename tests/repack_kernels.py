"""The repacked Q4_K / Q6_K kernels of the loaded runtime's ggml-cpu through ctypes, with random interleaved blocks
and quantized activations: for the bit-identity tests of patches 0016 / 0017 (``test_vnni_gemm.py``) and the kernel
timings of ``benchmarks/cpu_ops.py --kernels``.

Layouts (``ggml-cpu/repack.h``): ``block_q4_Kx8`` and ``block_q6_Kx8`` interleave 8 weight rows of one 256-element
super-block; ``block_q8_Kx4`` 4 activation rows, ``block_q8_K`` one. A GEMM is ``kernel(n, s, bs, vx, vy, nr, nc)``:
``nr`` activation rows (a multiple of 4) by ``nc`` weight rows (a multiple of 8) of length ``n``, into ``s`` with
row stride ``bs`` floats.
"""
from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Any, Callable

import numpy as np

QK_K = 256
Q4_KX8 = 8 * 2 + 8 * 2 + 96 + 1024     # d[8], dmin[8] (f16), scales[96], qs[1024]
Q8_KX4 = 4 * 4 + 4 * QK_K + 64 * 2      # d[4] (f32), qs[1024], bsums[64] (i16)
Q6_KX8 = 8 * 2 + 128 + 1024 + 512       # d[8] (f16), scales[128] (i8), ql[1024], qh[512]
Q8_K = 4 + QK_K + 16 * 2                # d (f32), qs[256], bsums[16] (i16)
_VP, _CI = ctypes.c_void_p, ctypes.c_int
GEMM_ARGS = [ctypes.c_int, _VP, ctypes.c_size_t, _VP, _VP, _CI, _CI]


def load_cpu(lib_dir: Path | None = None) -> Any:
    """The runtime's libggml-cpu (or ``lib_dir``'s) with the kernels' signatures, or None when the build has no
    AVX-512 VNNI."""
    from ggml_ctypes import Ggml

    lib = Ggml(lib_dir).cpu
    lib.ggml_cpu_has_avx512_vnni.restype = _CI
    lib.ggml_cpu_has_avx512.restype = _CI
    # (ggml reports no AVX512BW of its own; every CPU with AVX-512 VNNI has BW)
    if not (lib.ggml_cpu_has_avx512() and lib.ggml_cpu_has_avx512_vnni()):
        return None
    # a build with the ISA must export the kernel (a wrong guard would silently keep upstream's)
    for name in ("ggml_gemm_q4_K_8x8_q8_K", "ggml_gemm_q4_K_8x8_q8_K_vnni", "ggml_gemm_q6_K_8x8_q8_K"):
        getattr(lib, name).argtypes = GEMM_ARGS
        getattr(lib, name).restype = None
    lib.ggml_gemv_q6_K_8x8_q8_K_rows.argtypes = [ctypes.c_int, _VP, _VP, _VP, _CI, _CI]
    lib.ggml_gemv_q6_K_8x8_q8_K_rows.restype = None
    for name in ("ggml_quantize_mat_q8_K_4x8", "quantize_row_q8_K"):
        getattr(lib, name).argtypes = [_VP, _VP, ctypes.c_int64]
        getattr(lib, name).restype = None
    return lib


def f16_scales(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Random half-precision block scales of both signs over f16's normal range (2^-14 to 2^15), as bytes."""
    exp = rng.uniform(-14, 15, size=shape)
    return (rng.choice([-1.0, 1.0], size=shape) * 2.0 ** exp).astype(np.float16).view(np.uint8)


def weights(rng: np.random.Generator, nc: int, nb: int, block: int = Q4_KX8, halves: int = 16) -> np.ndarray:
    """``nc / 8`` column groups of ``nb`` random interleaved blocks (``block`` bytes, the first ``halves`` of them f16
    scales) as bytes; all other bytes random (every quant, scale and min value)."""
    raw = rng.integers(0, 256, size=(nc // 8, nb, block), dtype=np.uint8)
    raw[..., :2 * halves] = f16_scales(rng, (nc // 8, nb, halves)).reshape(nc // 8, nb, 2 * halves)
    return raw


def floats(rng: np.random.Generator, n: int, nr: int) -> np.ndarray:
    """``[nr, n]`` normal floats, 1 % of them 50x outliers, each row scaled by 10^-3 .. 10^3."""
    x = rng.standard_normal((nr, n)).astype(np.float32)
    x[rng.random(x.shape) < 0.01] *= 50.0
    return x * 10.0 ** rng.uniform(-3, 3, size=(nr, 1)).astype(np.float32)


def activations(cpu, x: np.ndarray) -> np.ndarray:
    """Rows ``x`` quantized 4 rows a block (``block_q8_Kx4``) by the runtime."""
    nr, n = x.shape
    out = np.zeros((nr // 4, n // QK_K, Q8_KX4), dtype=np.uint8)
    for g in range(nr // 4):
        rows = np.ascontiguousarray(x[4 * g:4 * g + 4])
        cpu.ggml_quantize_mat_q8_K_4x8(rows.ctypes.data, out[g].ctypes.data, n)
    return out


def gemm_call(cpu, name: str, n: int, w: np.ndarray, a: np.ndarray, nr: int,
              nc: int) -> tuple[Callable[[], None], np.ndarray]:
    """The GEMM kernel ``name`` of weights ``w`` by quantized activations ``a``, ready to run: ``(run, out)``, where
    ``run()`` writes the ``[nr, nc]`` floats into ``out`` (NaN until then) and does nothing else, so it can be timed."""
    out = np.full((nr, nc), np.nan, dtype=np.float32)
    fn, args = getattr(cpu, name), (n, out.ctypes.data, nc, w.ctypes.data, a.ctypes.data, nr, nc)
    return (lambda: fn(*args)), out


def gemm(cpu, name: str, n: int, w: np.ndarray, a: np.ndarray, nr: int, nc: int) -> np.ndarray:
    """The GEMM kernel ``name`` of weights ``w`` by quantized activations ``a``: ``[nr, nc]`` floats."""
    run, out = gemm_call(cpu, name, n, w, a, nr, nc)
    run()
    return out


def rows_q8_k(cpu, x: np.ndarray) -> np.ndarray:
    """Rows ``x`` quantized one ``block_q8_K`` row each by the runtime, as MUL_MAT_ID's activations."""
    nr, n = x.shape
    out = np.zeros((nr, n // QK_K * Q8_K), dtype=np.uint8)
    for r in range(nr):
        cpu.quantize_row_q8_K(np.ascontiguousarray(x[r]).ctypes.data, out[r].ctypes.data, n)
    return out


def gemv_rows_call(cpu, name: str, n: int, w: np.ndarray, q: np.ndarray,
                   nc: int) -> tuple[Callable[[], None], np.ndarray]:
    """A multi-row GEMV (0009's ``ggml_gemv_q*_K_8x8_q8_K_rows``) of the ``block_q8_K`` rows ``q``, each passed
    through its own input and output pointer as MUL_MAT_ID passes an expert's scattered rows, ready to run:
    ``(run, out)`` as ``gemm_call``'s (the pointer arrays are made once, outside ``run``)."""
    m = q.shape[0]
    out = np.full((m, nc), np.nan, dtype=np.float32)
    out_ptrs = (_VP * m)(*[out.ctypes.data + r * nc * 4 for r in range(m)])
    in_ptrs = (_VP * m)(*[q.ctypes.data + r * q.shape[1] for r in range(m)])
    fn, args = getattr(cpu, name), (n, out_ptrs, w.ctypes.data, in_ptrs, m, nc)
    return (lambda: fn(*args)), out


def gemv_rows(cpu, name: str, n: int, w: np.ndarray, q: np.ndarray, nc: int) -> np.ndarray:
    """``gemv_rows_call``'s kernel run once: ``[rows, nc]`` floats."""
    run, out = gemv_rows_call(cpu, name, n, w, q, nc)
    run()
    return out
