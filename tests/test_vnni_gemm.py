"""Patches 0016 and 0017: the repacked Q4_K and Q6_K matmuls of a diffusion step with AVX-512 VNNI.

- 0016: the dense Q4_K GEMM (``block_q4_Kx8`` weights by ``block_q8_Kx4`` activations: wqkv, the attention output,
  the dense FFN and the shared expert of every step with 4 or more rows), against upstream ``ggml_gemm_q4_K_8x8_q8_K``
  (``DLLM_Q4K_GEMM=0``);
- 0017: the Q6_K GEMM (the output head) and multi-row GEMV (Q6_K routed experts) with Q6_K's -32 offset folded into
  vpdpbusd, against patch 0007 / 0009's kernels (``DLLM_Q6K_GEMM=0``).

The claim is "the same arithmetic": exact integer sums and the replaced kernel's float steps in its order, so the
outputs must be *bit-identical*. Checked twice for each:
- op level, through the loaded runtime's exported kernels on random blocks (every scale and min byte, half-precision
  block scales over f16's range, activations with outliers), for row counts that use every tile size and remainder,
  and 1 to 9 super-blocks per row. Q4_K calls both kernels in one process; the Q6_K switch is read once per process,
  so the 0007 side runs in a child;
- end to end, a MoE model's logits and greedy tokens with the switch unset and ``=0`` (children).
A build without AVX-512 VNNI has neither kernel: the op tests are skipped there, and the end-to-end ones compare the
same kernels with themselves.
"""
from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import pytest

from ggml_ctypes import in_child
from runtime_marks import needs_runtime
from switch_compare import assert_switch_is_bit_identical, tiny_moe

pytestmark = needs_runtime

QK_K = 256
Q4_KX8 = 8 * 2 + 8 * 2 + 96 + 1024     # d[8], dmin[8] (f16), scales[96], qs[1024]
Q8_KX4 = 4 * 4 + 4 * QK_K + 64 * 2      # d[4] (f32), qs[1024], bsums[64] (i16)
Q6_KX8 = 8 * 2 + 128 + 1024 + 512       # d[8] (f16), scales[128] (i8), ql[1024], qh[512]
Q8_K = 4 + QK_K + 16 * 2                # d (f32), qs[256], bsums[16] (i16)
_VP, _CI = ctypes.c_void_p, ctypes.c_int
GEMM_ARGS = [ctypes.c_int, _VP, ctypes.c_size_t, _VP, _VP, _CI, _CI]


def _load_cpu():
    """The runtime's libggml-cpu with the kernels' signatures, or None when the build has no AVX-512 VNNI."""
    from ggml_ctypes import Ggml

    lib = Ggml().cpu
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


@pytest.fixture(scope="module")
def cpu():
    lib = _load_cpu()
    if lib is None:
        pytest.skip("this runtime was built without AVX-512 VNNI, so it has no VNNI Q4_K / Q6_K kernels")
    return lib


def _f16_scales(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Random half-precision block scales of both signs over f16's normal range (2^-14 to 2^15), as bytes."""
    exp = rng.uniform(-14, 15, size=shape)
    return (rng.choice([-1.0, 1.0], size=shape) * 2.0 ** exp).astype(np.float16).view(np.uint8)


def _weights(rng: np.random.Generator, nc: int, nb: int, block: int = Q4_KX8, halves: int = 16) -> np.ndarray:
    """``nc / 8`` column groups of ``nb`` random interleaved blocks (``block`` bytes, the first ``halves`` of them f16
    scales) as bytes: every other byte random."""
    raw = rng.integers(0, 256, size=(nc // 8, nb, block), dtype=np.uint8)
    raw[..., :2 * halves] = _f16_scales(rng, (nc // 8, nb, halves)).reshape(nc // 8, nb, 2 * halves)
    return raw


def _floats(rng: np.random.Generator, n: int, nr: int) -> np.ndarray:
    x = rng.standard_normal((nr, n)).astype(np.float32)
    x[rng.random(x.shape) < 0.01] *= 50.0
    return x * 10.0 ** rng.uniform(-3, 3, size=(nr, 1)).astype(np.float32)


def _activations(cpu, x: np.ndarray) -> np.ndarray:
    """Rows ``x`` quantized 4 rows a block (``block_q8_Kx4``) by the runtime."""
    nr, n = x.shape
    out = np.zeros((nr // 4, n // QK_K, Q8_KX4), dtype=np.uint8)
    for g in range(nr // 4):
        rows = np.ascontiguousarray(x[4 * g:4 * g + 4])
        cpu.ggml_quantize_mat_q8_K_4x8(rows.ctypes.data, out[g].ctypes.data, n)
    return out


def _gemm(cpu, name: str, n: int, w: np.ndarray, a: np.ndarray, nr: int, nc: int) -> np.ndarray:
    s = np.full((nr, nc), np.nan, dtype=np.float32)
    getattr(cpu, name)(n, s.ctypes.data, nc, w.ctypes.data, a.ctypes.data, nr, nc)
    return s


@pytest.mark.parametrize("n,nc,nr", [(256, 8, 4), (512, 24, 8), (768, 16, 12), (2304, 40, 20), (1024, 64, 32)])
def test_vnni_gemm_is_bit_identical_to_upstream(cpu, n, nc, nr):
    rng = np.random.default_rng(n + nc + nr)
    w = _weights(rng, nc, n // QK_K)
    a = _activations(cpu, _floats(rng, n, nr))
    want = _gemm(cpu, "ggml_gemm_q4_K_8x8_q8_K", n, w, a, nr, nc)
    got = _gemm(cpu, "ggml_gemm_q4_K_8x8_q8_K_vnni", n, w, a, nr, nc)
    assert np.isfinite(want).all() and np.abs(want).max() > 0
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), np.abs(got - want).max()


def test_model_is_bit_identical_with_and_without_the_vnni_gemm(tmp_path):
    assert_switch_is_bit_identical(tiny_moe(tmp_path, seed=23)["q4_k_m"], "DLLM_Q4K_GEMM", tmp_path)


def q6_outputs(n: int, nc: int, nr: int) -> dict[str, np.ndarray]:
    """The Q6_K GEMM (``nr`` rows as ``block_q8_Kx4``) and multi-row GEMV (``nr + 3`` rows as ``block_q8_K``, each
    through its own pointer as MUL_MAT_ID passes them: 4-row tiles, a 2-row tile and a last single row) of random
    ``block_q6_Kx8`` weights; run here and in a child."""
    cpu = _load_cpu()
    rng = np.random.default_rng(3 * n + nc + nr)
    w = _weights(rng, nc, n // QK_K, Q6_KX8, 8)
    x = _floats(rng, n, nr + 3)
    gemm = _gemm(cpu, "ggml_gemm_q6_K_8x8_q8_K", n, w, _activations(cpu, x[:nr]), nr, nc)
    m = nr + 3
    rows_q = np.zeros((m, n // QK_K * Q8_K), dtype=np.uint8)
    for r in range(m):
        cpu.quantize_row_q8_K(np.ascontiguousarray(x[r]).ctypes.data, rows_q[r].ctypes.data, n)
    rows = np.full((m, nc), np.nan, dtype=np.float32)
    out_ptrs = (_VP * m)(*[rows.ctypes.data + r * nc * 4 for r in range(m)])
    in_ptrs = (_VP * m)(*[rows_q.ctypes.data + r * rows_q.shape[1] for r in range(m)])
    cpu.ggml_gemv_q6_K_8x8_q8_K_rows(n, out_ptrs, w.ctypes.data, in_ptrs, m, nc)
    return {"gemm": gemm, "rows": rows}


@pytest.mark.parametrize("n,nc,nr", [(256, 8, 4), (512, 24, 8), (768, 16, 12), (2304, 40, 20), (1024, 64, 32)])
def test_q6_k_folded_offsets_are_bit_identical_to_0007(cpu, n, nc, nr, tmp_path: Path):
    got = q6_outputs(n, nc, nr)
    want = in_child("test_vnni_gemm", "q6_outputs", [n, nc, nr], {"DLLM_Q6K_GEMM": "0"}, tmp_path / "up.npz")
    for k in ("gemm", "rows"):
        assert np.isfinite(want[k]).all() and np.abs(want[k]).max() > 0, k
        assert np.array_equal(got[k].view(np.uint32), want[k].view(np.uint32)), (k, np.abs(got[k] - want[k]).max())


def test_model_is_bit_identical_with_and_without_the_folded_q6_k_offsets(tmp_path):
    assert_switch_is_bit_identical(tiny_moe(tmp_path, seed=29)["q4_k_m"], "DLLM_Q6K_GEMM", tmp_path)
