"""Patch 0014: ggml-cpu's f32 x f32 ``MUL_MAT`` reads each src0 row once for up to 4 src1 rows (K·Q on the f32 KV
cache: the attention's Q is a permuted view, so llamafile's sgemm, which wants a contiguous src1, never takes it, and
upstream ran one ``vec_dot`` call per (K row, Q row) pair). Every dot product keeps ``ggml_vec_dot_f32``'s
accumulators, order and reduction, so the claim is *bit-identical* results.

Checked op by op on graphs computed by the runtime's own ggml (2 threads) against the same graph in a child with
``DLLM_F32_ROWS=0`` (upstream's per-row loop; the switch is read once per process): K·Q on Q's permuted view for
shapes with GQA broadcast, token counts that leave 1-3 rows over, ``k`` not a multiple of the vector step (the kernel
declines; ``vec_dot`` runs) and one token, plus a contiguous f32 product too narrow for sgemm; all within 1e-5 of a
float64 product. End to end, the logits of steps and an AR token and the greedy tokens of quality and speed generation
are bit-identical to ``DLLM_F32_ROWS=0`` on f32 and Q4_K_M MoE models.
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

GGML_TYPE_F32 = 0
CHILD = Path(__file__).with_name("moe_rows_child.py")
# (head_dim, n_kv, n_head_kv, n_head, n_tokens)
SHAPES = [
    (128, 288, 4, 16, 32),   # the mini shape's block step at a 256-token prefix (GQA 4:1)
    (64, 40, 2, 2, 7),       # 7 tokens: groups of 4 + 3 rows
    (128, 37, 1, 3, 6),      # an odd key count, 6 tokens: 4 + 2
    (72, 36, 1, 3, 5),       # k not a multiple of the vector step: the kernel declines, vec_dot runs
    (64, 32, 2, 4, 1),       # one token
]


class _InitParams(ctypes.Structure):
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]


def _ggml():
    """libggml-base + libggml-cpu of the loaded runtime, with the few signatures used here."""
    from dllm_cli.runtime.library import load

    lib = load().path / "lib"
    base = ctypes.CDLL(str(sorted(lib.glob("libggml-base.so*"))[0]))
    cpu = ctypes.CDLL(str(sorted(lib.glob("libggml-cpu.so*"))[0]))
    vp, i64, ci = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    base.ggml_init.restype, base.ggml_init.argtypes = vp, [_InitParams]
    base.ggml_free.restype, base.ggml_free.argtypes = None, [vp]
    base.ggml_new_tensor_3d.restype, base.ggml_new_tensor_3d.argtypes = vp, [vp, ci, i64, i64, i64]
    base.ggml_get_data.restype, base.ggml_get_data.argtypes = vp, [vp]
    base.ggml_permute.restype, base.ggml_permute.argtypes = vp, [vp, vp, ci, ci, ci, ci]
    base.ggml_mul_mat.restype, base.ggml_mul_mat.argtypes = vp, [vp, vp, vp]
    base.ggml_new_graph.restype, base.ggml_new_graph.argtypes = vp, [vp]
    base.ggml_build_forward_expand.restype, base.ggml_build_forward_expand.argtypes = None, [vp, vp]
    cpu.ggml_graph_compute_with_ctx.restype = ctypes.c_int
    cpu.ggml_graph_compute_with_ctx.argtypes = [vp, vp, ctypes.c_int]
    return base, cpu


def products(shape: tuple, seed: int = 0) -> dict[str, np.ndarray]:
    """ggml-cpu's f32 products for ``shape`` (see SHAPES): ``kq``, K·Q on Q's permuted view
    ([n_head, n_tokens, n_kv]), and ``narrow``, K of head 0 times a contiguous [head_dim, 3] matrix (3 columns and
    the key count: too small or odd for sgemm, so the vec_dot path); ``*_ref`` the same in float64 by numpy."""
    head_dim, n_kv, n_head_kv, n_head, n_tok = shape
    rng = np.random.default_rng(seed)
    k = rng.standard_normal((n_head_kv, n_kv, head_dim)).astype(np.float32)
    q = rng.standard_normal((n_tok, n_head, head_dim)).astype(np.float32)  # ggml [head_dim, n_head, n_tokens]
    c = rng.standard_normal((1, 3, head_dim)).astype(np.float32)
    base, cpu = _ggml()
    ctx = base.ggml_init(_InitParams(64 << 20, None, False))
    assert ctx
    try:
        tk = base.ggml_new_tensor_3d(ctx, GGML_TYPE_F32, head_dim, n_kv, n_head_kv)
        tq = base.ggml_new_tensor_3d(ctx, GGML_TYPE_F32, head_dim, n_head, n_tok)
        tk0 = base.ggml_new_tensor_3d(ctx, GGML_TYPE_F32, head_dim, n_kv | 1, 1)  # an odd row count
        tc = base.ggml_new_tensor_3d(ctx, GGML_TYPE_F32, head_dim, 3, 1)
        k0 = np.ascontiguousarray(np.resize(k[0], (n_kv | 1, head_dim)))[None]
        for t, arr in ((tk, k), (tq, q), (tk0, k0), (tc, c)):
            ctypes.memmove(base.ggml_get_data(t), arr.ctypes.data, arr.nbytes)
        outs = {"kq": (base.ggml_mul_mat(ctx, tk, base.ggml_permute(ctx, tq, 0, 2, 1, 3)), (n_head, n_tok, n_kv)),
                "narrow": (base.ggml_mul_mat(ctx, tk0, tc), (1, 3, n_kv | 1))}
        gf = base.ggml_new_graph(ctx)
        for t, _ in outs.values():
            base.ggml_build_forward_expand(gf, t)
        assert cpu.ggml_graph_compute_with_ctx(ctx, gf, 2) == 0
        res = {}
        for name, (t, shp) in outs.items():
            arr = np.empty(shp, np.float32)
            ctypes.memmove(arr.ctypes.data, base.ggml_get_data(t), arr.nbytes)
            res[name] = arr
    finally:
        base.ggml_free(ctx)
    kk = np.repeat(k.astype(np.float64), n_head // n_head_kv, axis=0)  # head h reads kv head h // (n_head / n_kv)
    res["kq_ref"] = np.einsum("hkd,thd->htk", kk, q.astype(np.float64))
    res["narrow_ref"] = np.einsum("kd,cd->ck", k0[0].astype(np.float64), c[0].astype(np.float64))[None]
    return res


def _upstream(shape: tuple, tmp_path: Path) -> dict[str, np.ndarray]:
    """``products(shape)`` in a child with ``DLLM_F32_ROWS=0``."""
    out = tmp_path / "upstream.npz"
    code = ("import sys, json, numpy as np; sys.path.insert(0, sys.argv[1]); from test_f32_rows import products; "
            "np.savez(sys.argv[3], **products(tuple(json.loads(sys.argv[2]))))")
    res = subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent), json.dumps(list(shape)), str(out)],
                         env=dict(os.environ, DLLM_F32_ROWS="0"), capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    with np.load(out) as z:
        return dict(z)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_f32_products_are_bit_identical_to_the_per_row_loop(shape, tmp_path):
    got, want = products(shape), _upstream(shape, tmp_path)
    for name in ("kq", "narrow"):
        err = np.abs(got[name] - got[name + "_ref"]).max() / np.abs(got[name + "_ref"]).max()
        assert err < 1e-5, (name, err)
        assert np.array_equal(got[name], want[name]), (name, np.abs(got[name] - want[name]).max())


@pytest.fixture(scope="module")
def moe_files(tmp_path_factory):
    """A 3-layer MoE LLaDA2 (8 experts, top-2, head_dim 64) in f32 and Q4_K_M."""
    from converters import convert
    from dllm_cli.demo.checkpoint import tiny_config, write_checkpoint
    from dllm_cli.runtime.quantize import quantize

    d = tmp_path_factory.mktemp("f32-rows")
    cfg = tiny_config(hidden_size=256, intermediate_size=512, moe_intermediate_size=256, head_dim=64)
    write_checkpoint(d / "ckpt", cfg, seed=13, head_scale=2.0)
    f32 = convert(d / "ckpt", d / "m-f32.gguf", outtype="f32").path
    return {"f32": f32, "q4_k_m": quantize(f32, d / "m-q4_k_m.gguf", "q4_k_m")}


@pytest.mark.parametrize("quant", ["f32", "q4_k_m"])
def test_model_logits_and_tokens_are_bit_identical(moe_files, quant, tmp_path):
    """End to end against ``DLLM_F32_ROWS=0``: logits of 1-, 3-, 5- and 32-token steps and an AR token, and the
    greedy tokens of quality and speed generation."""
    outs = {}
    for flag in ("1", "0"):
        out = tmp_path / f"rows{flag}.npz"
        res = subprocess.run([sys.executable, str(CHILD), str(moe_files[quant]), str(out), "1"],
                             env=dict(os.environ, DLLM_F32_ROWS=flag), capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
        outs[flag] = np.load(out)
    a, b = outs["1"], outs["0"]
    for k in ("step1", "step3", "step5", "step32", "ar"):
        assert 1.0 < np.abs(a[k]).max() < 100.0 and np.array_equal(a[k], b[k]), (k, np.abs(a[k] - b[k]).max())
    assert json.loads(str(a["tokens"])) == json.loads(str(b["tokens"]))
