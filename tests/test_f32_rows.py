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


import numpy as np
import pytest

from ggml_ctypes import Ggml, in_child
from runtime_marks import needs_runtime
from switch_compare import assert_switch_is_bit_identical, tiny_moe

pytestmark = needs_runtime

# (head_dim, n_kv, n_head_kv, n_head, n_tokens)
SHAPES = [
    (128, 288, 4, 16, 32),   # the mini shape's block step at a 256-token prefix (GQA 4:1)
    (64, 40, 2, 2, 7),       # 7 tokens: groups of 4 + 3 rows
    (128, 37, 1, 3, 6),      # an odd key count, 6 tokens: 4 + 2
    (72, 36, 1, 3, 5),       # k not a multiple of the vector step: the kernel declines, vec_dot runs
    (64, 32, 2, 4, 1),       # one token
]


def products(*shape: int, seed: int = 0) -> dict[str, np.ndarray]:
    """ggml-cpu's f32 products for ``shape`` (see SHAPES): ``kq``, K·Q on Q's permuted view
    ([n_head, n_tokens, n_kv]), and ``narrow``, K of head 0 times a contiguous [head_dim, 3] matrix (3 columns and
    the key count: too small or odd for sgemm, so the vec_dot path); ``*_ref`` the same in float64 by numpy."""
    head_dim, n_kv, n_head_kv, n_head, n_tok = shape
    rng = np.random.default_rng(seed)
    k = rng.standard_normal((n_head_kv, n_kv, head_dim)).astype(np.float32)
    q = rng.standard_normal((n_tok, n_head, head_dim)).astype(np.float32)  # ggml [head_dim, n_head, n_tokens]
    c = rng.standard_normal((1, 3, head_dim)).astype(np.float32)
    k0 = np.ascontiguousarray(np.resize(k[0], (n_kv | 1, head_dim)))[None]  # an odd row count

    def build(g):
        view = g.op("permute", g.tensor(q), 0, 2, 1, 3)  # [head_dim, n_tokens, n_head], rows contiguous
        return {"kq": (g.op("mul_mat", g.tensor(k), view), (n_head, n_tok, n_kv), np.float32),
                "narrow": (g.op("mul_mat", g.tensor(k0), g.tensor(c)), (1, 3, n_kv | 1), np.float32)}

    res = Ggml().run(build)
    kk = np.repeat(k.astype(np.float64), n_head // n_head_kv, axis=0)  # head h reads kv head h // (n_head / n_kv)
    res["kq_ref"] = np.einsum("hkd,thd->htk", kk, q.astype(np.float64))
    res["narrow_ref"] = np.einsum("kd,cd->ck", k0[0].astype(np.float64), c[0].astype(np.float64))[None]
    return res


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_f32_products_are_bit_identical_to_the_per_row_loop(shape, tmp_path):
    got = products(*shape)
    want = in_child("test_f32_rows", "products", list(shape), {"DLLM_F32_ROWS": "0"}, tmp_path / "up.npz")
    for name in ("kq", "narrow"):
        err = np.abs(got[name] - got[name + "_ref"]).max() / np.abs(got[name + "_ref"]).max()
        assert err < 1e-5, (name, err)
        assert np.array_equal(got[name], want[name]), (name, np.abs(got[name] - want[name]).max())


@pytest.fixture(scope="module")
def moe_files(tmp_path_factory):
    return tiny_moe(tmp_path_factory.mktemp("f32-rows"), seed=13)


@pytest.mark.parametrize("quant", ["f32", "q4_k_m"])
def test_model_logits_and_tokens_are_bit_identical(moe_files, quant, tmp_path):
    """End to end against ``DLLM_F32_ROWS=0``: logits of 1-, 3-, 5- and 32-token steps and an AR token, and the
    greedy tokens of quality and speed generation."""
    assert_switch_is_bit_identical(moe_files[quant], "DLLM_F32_ROWS", tmp_path)
