"""Patch 0013: ggml-cpu's add / sub / mul / div with a one-element src1 row (``ne10 == 1``, e.g. the MoE expert
weighting ``[n_embd, n_expert_used, n_tokens] x [1, n_expert_used, n_tokens]``) run each src0 row against that
scalar in one loop instead of one call per element.

The claim is "the same single float operation per element", so the results must be *bit-identical* to IEEE single
precision: checked op by op against numpy on graphs computed by the runtime's own ggml (2 threads; shapes with vector
tails and broadcasts along dims 1 and 2; f32 and f16 src0 / dst), and end to end: the logits and greedy tokens of a
MoE model equal those of the same build run with ``DLLM_BINARY_SCALAR=0`` (upstream's per-element calls).
"""
from __future__ import annotations

import numpy as np
import pytest

from ggml_ctypes import Ggml
from runtime_marks import needs_runtime
from switch_compare import assert_switch_is_bit_identical, tiny_moe

pytestmark = needs_runtime

OPS = {"add": np.add, "sub": np.subtract, "mul": np.multiply, "div": np.divide}


@pytest.fixture(scope="module")
def ggml():
    return Ggml()


def _compute(ggml, op: str, x: np.ndarray, y: np.ndarray, threads: int = 2) -> np.ndarray:
    """``ggml_<op>(x, y)`` computed by ggml-cpu; the result has x's shape and dtype."""
    return ggml.run(lambda g: {"out": (g.op(op, g.tensor(x), g.tensor(y)), x.shape, x.dtype)}, threads)["out"]


@pytest.mark.parametrize("op", sorted(OPS))
@pytest.mark.parametrize("shape0, shape1", [
    ((32, 8, 2048), (32, 8, 1)),   # the MoE weighting: one weight per (token, expert) row
    ((5, 3, 37), (1, 3, 1)),       # a vector tail, src1 broadcast along dim 2
    ((4, 6, 100), (4, 1, 1)),      # broadcast along dim 1
    ((2, 2, 17), (1, 1, 1)),       # one scalar for everything
])
def test_scalar_row_ops_are_exact_f32(ggml, op, shape0, shape1):
    rng = np.random.default_rng(len(op) + shape0[2])
    x = rng.standard_normal(shape0).astype(np.float32) * 3
    y = (rng.standard_normal(shape1).astype(np.float32) + 0.5).astype(np.float32)
    got = _compute(ggml, op, x, y)
    want = OPS[op](x, y, dtype=np.float32)
    assert got.dtype == np.float32 and np.array_equal(got, want), np.abs(got - want).max()


@pytest.mark.parametrize("op", sorted(OPS))
def test_scalar_row_ops_are_exact_f16(ggml, op):
    """f16 src0 and dst with an f16 scalar: widen, one f32 op, round to f16 (what numpy does in that order)."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((3, 4, 70)).astype(np.float16)
    y = (rng.standard_normal((3, 4, 1)) + 2).astype(np.float16)
    got = _compute(ggml, op, x, y)
    want = OPS[op](x.astype(np.float32), y.astype(np.float32), dtype=np.float32).astype(np.float16)
    assert np.array_equal(got, want)


def test_moe_logits_and_tokens_equal_the_per_element_path(moe_file_q4, tmp_path):
    """End to end: the MoE weighting through the scalar loop gives the same bits as upstream's per-element calls."""
    assert_switch_is_bit_identical(moe_file_q4, "DLLM_BINARY_SCALAR", tmp_path)


@pytest.fixture(scope="module")
def moe_file_q4(tmp_path_factory):
    """Every MoE layer of the tiny MoE weights its experts with a [1, 2, n] MUL."""
    return tiny_moe(tmp_path_factory.mktemp("binary-scalar"), seed=11)["q4_k_m"]
