"""Patch 0015: ggml-cpu's ``SOFT_MAX`` and ``TOP_K`` make fewer passes over long rows (the confidence head runs both
over the [n_vocab, n_rows] logits of every step). ``SOFT_MAX`` reads an unmasked, unscaled row where it is and takes
its maximum with vector instructions; ``TOP_K`` hands ``std::partial_sort`` only the indices that can enter its heap.
The claim is *bit-identical* output, checked on graphs computed by the runtime's ggml (2 threads) against the same
graphs in a child with ``DLLM_ROW_OPS=0`` (upstream's loops; read once per process): vocabulary-long rows, short rows
with vector tails, ties (a few distinct values), ascending rows (every index enters the heap), -inf entries, a masked
and scaled softmax of the attention's shape, and rows holding a NaN (every output NaN / upstream's indices). End to
end: a MoE model's logits and greedy tokens against ``DLLM_ROW_OPS=0``.
"""
from __future__ import annotations


import numpy as np
import pytest

from ggml_ctypes import Ggml, in_child
from runtime_marks import needs_runtime
from switch_compare import assert_switch_is_bit_identical, tiny_moe

pytestmark = needs_runtime

ROWS = {  # name: (rows, length)
    "vocab": (4, 157_184),
    "tail": (3, 77),
    "short": (2, 20),
}


def _rows(kind: str, n_rows: int, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((n_rows, n)) * 4).astype(np.float32)
    if kind == "ties":
        x = np.round(x / 4).astype(np.float32)  # ~9 distinct values: ties at every top-k boundary
    elif kind == "ascending":
        x = np.sort(x, axis=1)
    elif kind == "descending":
        x = -np.sort(x, axis=1)
    elif kind == "neg_inf":
        x[:, ::3] = -np.inf
    elif kind == "nan":
        x[:, n // 2] = np.nan
    return x


def row_ops(kind: str, size: str, k: int) -> dict[str, np.ndarray]:
    """softmax and top_k of ``_rows(kind, *ROWS[size])``, plus a masked, scaled softmax of [288, 32, 4] scores."""
    n_rows, n = ROWS[size]
    x = _rows(kind, n_rows, n, seed=n + k)
    rng = np.random.default_rng(1)
    scores = rng.standard_normal((4, 32, 288)).astype(np.float32) * 3
    mask = np.where(rng.random((1, 32, 288)) < 0.2, -np.inf, 0.0).astype(np.float32)

    def build(g):
        t = g.tensor(x)
        return {"softmax": (g.op("soft_max", t), x.shape, np.float32),
                "top_k": (g.op("top_k", t, k), (n_rows, k), np.int32),
                "masked": (g.op("soft_max_ext", g.tensor(scores), g.tensor(mask), 0.088388, 0.0), scores.shape,
                           np.float32)}

    return Ggml().run(build)


CASES = [(kind, size, k) for kind in ("random", "ties", "ascending", "descending", "neg_inf", "nan")
         for size in ROWS for k in (1, 3, 8) if k < ROWS[size][1]]


@pytest.mark.parametrize("kind, size, k", CASES, ids=lambda v: str(v))
def test_softmax_and_top_k_are_bit_identical_to_upstream(kind, size, k, tmp_path):
    got = row_ops(kind, size, k)
    want = in_child("test_row_ops", "row_ops", [kind, size, k], {"DLLM_ROW_OPS": "0"}, tmp_path / "up.npz")
    for name in ("softmax", "masked"):
        a, b = got[name], want[name]
        assert np.array_equal(np.isnan(a), np.isnan(b)), name
        assert np.array_equal(np.nan_to_num(a), np.nan_to_num(b)), (name, np.nanmax(np.abs(a - b)))
    assert np.array_equal(got["top_k"], want["top_k"])
    if kind == "nan":
        assert np.isnan(got["softmax"]).all()
    elif kind in ("random", "descending"):  # the top values by numpy (no ties here)
        x = _rows(kind, *ROWS[size], seed=ROWS[size][1] + k)
        top = np.sort(np.take_along_axis(x, got["top_k"].astype(np.int64), axis=1), axis=1)
        assert np.array_equal(top, np.sort(x, axis=1)[:, -k:])
        ref = np.exp(x.astype(np.float64) - x.max(axis=1, keepdims=True))
        assert np.allclose(got["softmax"], ref / ref.sum(axis=1, keepdims=True), rtol=1e-5, atol=1e-9)


def test_model_logits_and_tokens_are_bit_identical(tmp_path):
    """End to end on a Q4_K_M MoE model (its confidence head runs soft_max and top_k over the vocabulary)."""
    assert_switch_is_bit_identical(tiny_moe(tmp_path, seed=17)["q4_k_m"], "DLLM_ROW_OPS", tmp_path)
