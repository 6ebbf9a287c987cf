"""Patch 0013: ggml-cpu's add / sub / mul / div with a one-element src1 row (``ne10 == 1``, e.g. the MoE expert
weighting ``[n_embd, n_expert_used, n_tokens] x [1, n_expert_used, n_tokens]``) run each src0 row against that
scalar in one loop instead of one call per element.

The claim is "the same single float operation per element", so the results must be *bit-identical* to IEEE single
precision: checked op by op against numpy on graphs computed by the runtime's own ggml (2 threads; shapes with vector
tails and broadcasts along dims 1 and 2; f32 and f16 src0 / dst), and end to end: the logits and greedy tokens of a
MoE model equal those of the same build run with ``DLLM_BINARY_SCALAR=0`` (upstream's per-element calls).
"""
from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from runtime_marks import needs_runtime

pytestmark = needs_runtime

GGML_TYPE_F32, GGML_TYPE_F16 = 0, 1
OPS = {"add": np.add, "sub": np.subtract, "mul": np.multiply, "div": np.divide}
CHILD = Path(__file__).with_name("moe_rows_child.py")


class _InitParams(ctypes.Structure):
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]


@pytest.fixture(scope="module")
def ggml():
    """libggml-base + libggml-cpu of the loaded runtime, with the few signatures these tests call."""
    from dllm_cli.runtime.library import load

    lib = load().path / "lib"
    base = ctypes.CDLL(str(sorted(lib.glob("libggml-base.so*"))[0]))
    cpu = ctypes.CDLL(str(sorted(lib.glob("libggml-cpu.so*"))[0]))
    vp, i64 = ctypes.c_void_p, ctypes.c_int64
    base.ggml_init.restype, base.ggml_init.argtypes = vp, [_InitParams]
    base.ggml_free.restype, base.ggml_free.argtypes = None, [vp]
    base.ggml_new_tensor_3d.restype, base.ggml_new_tensor_3d.argtypes = vp, [vp, ctypes.c_int, i64, i64, i64]
    base.ggml_get_data.restype, base.ggml_get_data.argtypes = vp, [vp]
    base.ggml_new_graph.restype, base.ggml_new_graph.argtypes = vp, [vp]
    base.ggml_build_forward_expand.restype, base.ggml_build_forward_expand.argtypes = None, [vp, vp]
    for name in OPS:
        fn = getattr(base, f"ggml_{name}")
        fn.restype, fn.argtypes = vp, [vp, vp, vp]
    cpu.ggml_graph_compute_with_ctx.restype = ctypes.c_int
    cpu.ggml_graph_compute_with_ctx.argtypes = [vp, vp, ctypes.c_int]
    return base, cpu


def _tensor(base, ctx, arr: np.ndarray) -> int:
    """A ggml tensor holding ``arr`` (C order, numpy shape (ne2, ne1, ne0))."""
    t = base.ggml_new_tensor_3d(ctx, GGML_TYPE_F16 if arr.dtype == np.float16 else GGML_TYPE_F32, *arr.shape[::-1])
    ctypes.memmove(base.ggml_get_data(t), arr.ctypes.data, arr.nbytes)
    return t


def _compute(ggml, op: str, x: np.ndarray, y: np.ndarray, threads: int = 2) -> np.ndarray:
    """``ggml_<op>(x, y)`` computed by ggml-cpu; the result has x's shape and dtype."""
    base, cpu = ggml
    ctx = base.ggml_init(_InitParams(64 << 20, None, False))
    assert ctx
    try:
        out = getattr(base, f"ggml_{op}")(ctx, _tensor(base, ctx, x), _tensor(base, ctx, y))
        gf = base.ggml_new_graph(ctx)
        base.ggml_build_forward_expand(gf, out)
        assert cpu.ggml_graph_compute_with_ctx(ctx, gf, threads) == 0
        res = np.empty_like(x)
        ctypes.memmove(res.ctypes.data, base.ggml_get_data(out), res.nbytes)
        return res
    finally:
        base.ggml_free(ctx)


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
    outs = {}
    for flag in ("1", "0"):
        out = tmp_path / f"scalar{flag}.npz"
        res = subprocess.run([sys.executable, str(CHILD), str(moe_file_q4), str(out), "1"],
                             env=dict(os.environ, DLLM_BINARY_SCALAR=flag), capture_output=True, text=True,
                             timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
        outs[flag] = np.load(out)
    a, b = outs["1"], outs["0"]
    for k in ("step1", "step3", "step5", "step32", "ar"):
        assert 1.0 < np.abs(a[k]).max() < 100.0 and np.array_equal(a[k], b[k]), k
    assert json.loads(str(a["tokens"])) == json.loads(str(b["tokens"]))


@pytest.fixture(scope="module")
def moe_file_q4(tmp_path_factory):
    """A 3-layer Q4_K_M MoE LLaDA2 (8 experts, top-2): every MoE layer weights its experts with a [1, 2, n] MUL."""
    from converters import convert
    from dllm_cli.demo.checkpoint import tiny_config, write_checkpoint
    from dllm_cli.runtime.quantize import quantize

    d = tmp_path_factory.mktemp("binary-scalar")
    cfg = tiny_config(hidden_size=256, intermediate_size=512, moe_intermediate_size=256, head_dim=64)
    write_checkpoint(d / "ckpt", cfg, seed=11, head_scale=2.0)
    f32 = convert(d / "ckpt", d / "m-f32.gguf", outtype="f32").path
    return quantize(f32, d / "m-q4_k_m.gguf", "q4_k_m")
