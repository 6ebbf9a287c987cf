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
A build without AVX-512 VNNI has neither kernel (the switches change nothing there), so every test here is skipped.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ggml_ctypes import in_child
from repack_kernels import Q6_KX8, QK_K, activations, floats, gemm, gemv_rows, load_cpu, rows_q8_k, weights
from runtime_marks import needs_runtime
from switch_compare import assert_switch_is_bit_identical, tiny_moe

pytestmark = needs_runtime


@pytest.fixture(scope="module")
def cpu():
    lib = load_cpu()
    if lib is None:
        pytest.skip("this runtime was built without AVX-512 VNNI, so it has no VNNI Q4_K / Q6_K kernels")
    return lib


@pytest.mark.parametrize("n,nc,nr", [(256, 8, 4), (512, 24, 8), (768, 16, 12), (2304, 40, 20), (1024, 64, 32)])
def test_q4_k_vnni_gemm_is_bit_identical_to_upstream(cpu, n, nc, nr):
    rng = np.random.default_rng(n + nc + nr)
    w = weights(rng, nc, n // QK_K)
    a = activations(cpu, floats(rng, n, nr))
    want = gemm(cpu, "ggml_gemm_q4_K_8x8_q8_K", n, w, a, nr, nc)
    got = gemm(cpu, "ggml_gemm_q4_K_8x8_q8_K_vnni", n, w, a, nr, nc)
    assert np.isfinite(want).all() and np.abs(want).max() > 0
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), np.abs(got - want).max()


def test_model_is_bit_identical_with_and_without_the_q4_k_vnni_gemm(cpu, tmp_path):
    assert_switch_is_bit_identical(tiny_moe(tmp_path, seed=23)["q4_k_m"], "DLLM_Q4K_GEMM", tmp_path)


def q6_outputs(n: int, nc: int, nr: int) -> dict[str, np.ndarray]:
    """The Q6_K GEMM (``nr`` rows as ``block_q8_Kx4``) and multi-row GEMV (``nr + 3`` rows as ``block_q8_K``, each
    through its own pointer as MUL_MAT_ID passes them: 4-row tiles, a 2-row tile and a last single row) of random
    ``block_q6_Kx8`` weights; run here and in a child."""
    cpu = load_cpu()
    rng = np.random.default_rng(3 * n + nc + nr)
    w = weights(rng, nc, n // QK_K, Q6_KX8, 8)
    x = floats(rng, n, nr + 3)
    return {"gemm": gemm(cpu, "ggml_gemm_q6_K_8x8_q8_K", n, w, activations(cpu, x[:nr]), nr, nc),
            "rows": gemv_rows(cpu, "ggml_gemv_q6_K_8x8_q8_K_rows", n, w, rows_q8_k(cpu, x), nc)}


@pytest.mark.parametrize("n,nc,nr", [(256, 8, 4), (512, 24, 8), (768, 16, 12), (2304, 40, 20), (1024, 64, 32)])
def test_q6_k_folded_offsets_are_bit_identical_to_0007(cpu, n, nc, nr, tmp_path: Path):
    got = q6_outputs(n, nc, nr)
    want = in_child("test_vnni_gemm", "q6_outputs", [n, nc, nr], {"DLLM_Q6K_GEMM": "0"}, tmp_path / "up.npz")
    for k in ("gemm", "rows"):
        assert np.isfinite(want[k]).all() and np.abs(want[k]).max() > 0, k
        assert np.array_equal(got[k].view(np.uint32), want[k].view(np.uint32)), (k, np.abs(got[k] - want[k]).max())


def test_model_is_bit_identical_with_and_without_the_folded_q6_k_offsets(cpu, tmp_path):
    assert_switch_is_bit_identical(tiny_moe(tmp_path, seed=29)["q4_k_m"], "DLLM_Q6K_GEMM", tmp_path)
