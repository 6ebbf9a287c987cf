"""Patch 0016: the dense repacked Q4_K GEMM (``block_q4_Kx8`` weights by ``block_q8_Kx4`` activations: wqkv, the
attention output, the dense FFN and the shared expert of every step with 4 or more rows) with AVX-512 VNNI.

The claim is "the same arithmetic": exact integer sums and upstream ``ggml_gemm_q4_K_8x8_q8_K``'s float steps in its
order, so the outputs must be *bit-identical*. Checked twice:
- op level, through the two exported kernels of the loaded runtime on random blocks (every scale and min byte,
  half-precision block scales from 2^-14 to 2^15, activations with outliers), for row counts that use the kernel's
  8-row tiles, its 4-row remainder and both, and 1 to 9 super-blocks per row;
- end to end, a MoE model's logits and greedy tokens against ``DLLM_Q4K_GEMM=0`` (upstream's kernel in the same build;
  read once per process, hence the children).
A build without AVX-512 VNNI has no such kernel: the op test is skipped there, and the end-to-end one compares the
same kernel with itself.
"""
from __future__ import annotations

import ctypes

import numpy as np
import pytest

from runtime_marks import needs_runtime
from switch_compare import assert_switch_is_bit_identical, tiny_moe

pytestmark = needs_runtime

QK_K = 256
Q4_KX8 = 8 * 2 + 8 * 2 + 96 + 1024     # d[8], dmin[8] (f16), scales[96], qs[1024]
Q8_KX4 = 4 * 4 + 4 * QK_K + 64 * 2      # d[4] (f32), qs[1024], bsums[64] (i16)
_VP, _CI = ctypes.c_void_p, ctypes.c_int
GEMM_ARGS = [ctypes.c_int, _VP, ctypes.c_size_t, _VP, _VP, _CI, _CI]


@pytest.fixture(scope="module")
def cpu():
    from ggml_ctypes import Ggml

    lib = Ggml().cpu
    lib.ggml_cpu_has_avx512_vnni.restype = _CI
    lib.ggml_cpu_has_avx512.restype = _CI
    # (ggml reports no AVX512BW of its own; every CPU with AVX-512 VNNI has BW)
    if not (lib.ggml_cpu_has_avx512() and lib.ggml_cpu_has_avx512_vnni()):
        pytest.skip("this runtime was built without AVX-512 VNNI, so it has no VNNI Q4_K GEMM")
    # a build with the ISA must export the kernel (a wrong guard would silently keep upstream's)
    for name in ("ggml_gemm_q4_K_8x8_q8_K", "ggml_gemm_q4_K_8x8_q8_K_vnni"):
        getattr(lib, name).argtypes = GEMM_ARGS
        getattr(lib, name).restype = None
    lib.ggml_quantize_mat_q8_K_4x8.argtypes = [_VP, _VP, ctypes.c_int64]
    lib.ggml_quantize_mat_q8_K_4x8.restype = None
    return lib


def _weights(rng: np.random.Generator, nc: int, nb: int) -> np.ndarray:
    """``nc / 8`` column groups of ``nb`` random ``block_q4_Kx8`` as bytes; block scales spread over f16's range."""
    raw = rng.integers(0, 256, size=(nc // 8, nb, Q4_KX8), dtype=np.uint8)
    exp = rng.uniform(-14, 15, size=(nc // 8, nb, 16))
    scales = (rng.choice([-1.0, 1.0], size=exp.shape) * 2.0 ** exp).astype(np.float16)
    raw[..., :32] = scales.view(np.uint8).reshape(nc // 8, nb, 32)
    return raw


def _activations(cpu, rng: np.random.Generator, n: int, nr: int) -> np.ndarray:
    """``nr`` rows of ``n`` random floats with outliers, quantized 4 rows a block (``block_q8_Kx4``) by the runtime."""
    x = rng.standard_normal((nr, n)).astype(np.float32)
    x[rng.random(x.shape) < 0.01] *= 50.0
    x *= 10.0 ** rng.uniform(-3, 3, size=(nr, 1)).astype(np.float32)
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
    a = _activations(cpu, rng, n, nr)
    want = _gemm(cpu, "ggml_gemm_q4_K_8x8_q8_K", n, w, a, nr, nc)
    got = _gemm(cpu, "ggml_gemm_q4_K_8x8_q8_K_vnni", n, w, a, nr, nc)
    assert np.isfinite(want).all() and np.abs(want).max() > 0
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), np.abs(got - want).max()


def test_model_is_bit_identical_with_and_without_the_vnni_gemm(tmp_path):
    assert_switch_is_bit_identical(tiny_moe(tmp_path, seed=23)["q4_k_m"], "DLLM_Q4K_GEMM", tmp_path)
