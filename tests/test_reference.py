"""The numpy reference forward (dllm_cli.reference): masking, KV-cache exactness, routing, loaders, numerics.

Everything is tiny, offline and deterministic. ``naive_logits`` is an independent per-token, per-head loop
implementation of spec §3 that reads HF tensor names directly, so it also checks the loaders' renaming.
"""
from __future__ import annotations

import math

import gguf
import numpy as np
import pytest

from dllm_cli import gguf_keys as K
from dllm_cli.demo.checkpoint import random_weights, tiny_config, write_checkpoint
from dllm_cli.errors import ModelError, UsageError
from dllm_cli.reference import (
    RefConfig, RefModel, block_causal_mask, config_from_hf, expert_union, hf_to_weights, load_gguf, load_hf,
    rope_neox, route, softmax,
)
from dllm_cli.reference.forward import WEIGHT_SUM_FLOOR

B = 4  # block length of the test models
VOCAB = 41

CONFIGS = {
    # the default tiny model: 2 groups keep 1, one dense layer, D=16 with rope on 8 dims, 4/2 heads
    "groups2-dense1-d16": {},
    # no groups, two dense layers, D=8 fully rotated, 4 query heads on 1 KV head
    "groups1-dense2-d8": dict(n_group=1, topk_group=1, first_k_dense_replace=2, head_dim=8,
                              num_key_value_heads=1, partial_rotary_factor=1.0),
    # 4 groups keep 2, top-3, no weight normalisation, D=32 with rope on 8 dims, plain MHA
    "groups4-dense1-d32": dict(n_group=4, topk_group=2, num_experts_per_tok=3, head_dim=32, num_attention_heads=2,
                               num_key_value_heads=2, partial_rotary_factor=0.25, norm_topk_prob=False),
}


def hf_dict(name: str = "groups2-dense1-d16") -> dict:
    return tiny_config(vocab_size=VOCAB, **CONFIGS[name])


def make_model(name: str = "groups2-dense1-d16", dtype: type = np.float64, seed: int = 0) -> tuple[RefModel, dict]:
    """A RefModel built in memory from random HF-named weights; returns it with those weights."""
    hf = hf_dict(name)
    w = random_weights(hf, seed=seed, head_scale=3.0)
    cfg = config_from_hf(hf, block_length=B)
    return RefModel(cfg, hf_to_weights(lambda n, dt: w[n].astype(dt), set(w), cfg, dtype), dtype), w


def tokens(n: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, n)


# ---------------------------------------------------------------- independent loop oracle (spec §3)

def _rms(x, w, eps):
    return w * x / math.sqrt(float(np.mean(x * x)) + eps)


def _sig(x):
    return 1.0 / (1.0 + np.exp(-x))


def _swiglu(x, w, p):
    g, u = w[p + "gate_proj.weight"] @ x, w[p + "up_proj.weight"] @ x
    return w[p + "down_proj.weight"] @ (g * _sig(g) * u)


def _rope(x, pos, rot, theta):
    y, half = x.copy(), rot // 2
    for j in range(half):
        a = pos * theta ** (-2.0 * j / rot)
        y[j] = x[j] * math.cos(a) - x[j + half] * math.sin(a)
        y[j + half] = x[j + half] * math.cos(a) + x[j] * math.sin(a)
    return y


def _moe(x, w, p, c):
    e, k, ng, ku = c["num_experts"], c["num_experts_per_tok"], c["n_group"], c["topk_group"]
    s = _sig(w[p + "mlp.gate.weight"] @ x)
    sel = s + w[p + "mlp.gate.expert_bias"]
    per = e // ng
    gscore = [sum(sorted(sel[g * per:(g + 1) * per])[-2:]) for g in range(ng)]
    groups = sorted(range(ng), key=lambda g: -gscore[g])[:ku]
    cand = [i for i in range(e) if i // per in groups]
    chosen = sorted(cand, key=lambda i: -sel[i])[:k]
    wt = np.array([s[i] for i in chosen])
    if c["norm_topk_prob"]:
        wt = wt / max(wt.sum(), 6.103515625e-5)
    y = sum(wt[j] * c["routed_scaling_factor"] * _swiglu(x, w, f"{p}mlp.experts.{i}.") for j, i in enumerate(chosen))
    return y + _swiglu(x, w, p + "mlp.shared_experts.")


def naive_logits(w: dict, c: dict, ids: np.ndarray, block: int) -> np.ndarray:
    """Loop-by-loop LLaDA2 forward over a whole window with the block-causal mask, float64."""
    w = {n: a.astype(np.float64) for n, a in w.items()}
    hq, hkv, d, eps = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"], c["rms_norm_eps"]
    rot, theta, n = int(d * c["partial_rotary_factor"]), c["rope_theta"], len(ids)
    h = [w["model.word_embeddings.weight"][t].copy() for t in ids]
    for layer in range(c["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        qs, ks, vs = [], [], []
        for i in range(n):
            qkv = w[p + "attention.query_key_value.weight"] @ _rms(h[i], w[p + "input_layernorm.weight"], eps)
            heads = [qkv[j * d:(j + 1) * d] for j in range(hq + 2 * hkv)]
            qs.append([_rope(_rms(x, w[p + "attention.query_layernorm.weight"], eps), i, rot, theta)
                       for x in heads[:hq]])
            ks.append([_rope(_rms(x, w[p + "attention.key_layernorm.weight"], eps), i, rot, theta)
                       for x in heads[hq:hq + hkv]])
            vs.append(heads[hq + hkv:])
        new = []
        for i in range(n):
            seen = [j for j in range(n) if j // block <= i // block]
            outs = []
            for a in range(hq):
                g = a // (hq // hkv)
                sc = np.array([qs[i][a] @ ks[j][g] / math.sqrt(d) for j in seen])
                pr = np.exp(sc - sc.max()) / np.exp(sc - sc.max()).sum()
                outs.append(sum(pr[t] * vs[j][g] for t, j in enumerate(seen)))
            x = h[i] + w[p + "attention.dense.weight"] @ np.concatenate(outs)
            m = _rms(x, w[p + "post_attention_layernorm.weight"], eps)
            ffn = _swiglu(m, w, p + "mlp.") if layer < c["first_k_dense_replace"] else _moe(m, w, p, c)
            new.append(x + ffn)
        h = new
    return np.stack([w["lm_head.weight"] @ _rms(x, w["model.norm.weight"], eps) for x in h])


@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_loop_oracle(name):
    model, w = make_model(name)
    ids = tokens(10)
    got = model.forward(ids)
    assert got.shape == (10, VOCAB) and got.dtype == np.float64
    np.testing.assert_allclose(got, naive_logits(w, hf_dict(name), ids, B), rtol=0, atol=1e-10)


# ---------------------------------------------------------------- masking

@pytest.mark.parametrize("name", list(CONFIGS))
def test_block_causal_mask(name):
    model, _ = make_model(name)
    ids = tokens(12)
    base = model.forward(ids)
    later = ids.copy()
    later[9] = (later[9] + 1) % VOCAB  # block 2
    out = model.forward(later)
    # blocks 0, 1 cannot see block 2 (not bit-exact: the experts' token batches change, and with them BLAS rounding)
    np.testing.assert_allclose(out[:8], base[:8], rtol=0, atol=1e-12)
    assert np.all(np.abs(out[8:] - base[8:]).max(axis=-1) > 1e-6)  # every row of block 2 sees position 9
    same = ids.copy()
    same[5] = (same[5] + 1) % VOCAB  # block 1
    out = model.forward(same)
    np.testing.assert_allclose(out[:4], base[:4], rtol=0, atol=1e-12)
    assert np.abs(out[4] - base[4]).max() > 1e-6  # position 4 sees position 5 (bidirectional inside a block)
    assert np.all(np.abs(out[4:] - base[4:]).max(axis=-1) > 1e-6)


def test_mask_helpers_and_named_masks():
    m = block_causal_mask(np.array([0, 3, 4, 9]), np.arange(10), 4)
    assert m.shape == (4, 10)
    assert np.array_equal(np.isfinite(m[1]), np.arange(10) < 4)
    assert np.array_equal(np.isfinite(m[3]), np.arange(10) < 12)
    assert np.all(m[np.isfinite(m)] == 0.0)
    model, _ = make_model()
    ids = tokens(8)
    np.testing.assert_array_equal(model.forward(ids, mask=block_causal_mask(np.arange(8), np.arange(8), B)),
                                  model.forward(ids))
    causal = model.forward(ids, mask="causal")
    changed = ids.copy()
    changed[6] = (changed[6] + 1) % VOCAB
    np.testing.assert_allclose(model.forward(changed, mask="causal")[:6], causal[:6], rtol=0, atol=1e-12)
    full, full2 = model.forward(ids, mask="full"), model.forward(changed, mask="full")
    assert np.all(np.abs(full - full2).max(axis=-1) > 1e-6)  # every row sees position 6
    with pytest.raises(UsageError):
        model.forward(ids, mask="diagonal")
    with pytest.raises(UsageError):
        model.forward(ids, mask=np.zeros((8, 7)))


def test_softmax_with_masked_entries():
    p = softmax(np.array([[1.0, -np.inf, 1.0], [1000.0, 0.0, -np.inf]]))
    np.testing.assert_allclose(p, [[0.5, 0.0, 0.5], [1.0, 0.0, 0.0]], atol=1e-15)


# ---------------------------------------------------------------- KV cache

@pytest.mark.parametrize("name", list(CONFIGS))
def test_kv_prefix_equivalence_and_rollback(name):
    model, _ = make_model(name)
    ids = tokens(16)
    full = model.forward(ids)
    cache = model.new_cache()
    model.forward(ids[:8], cache=cache, commit=True)  # two prompt blocks in one call
    model.forward(ids[8:12], cache=cache, commit=True)
    assert cache.n_past == 12 and cache.k[0].shape == (12, model.cfg.n_head_kv, model.cfg.head_dim)
    snapshot = cache.copy()
    last = model.forward(ids[12:], cache=cache)  # positions default to 12..15
    np.testing.assert_allclose(last, full[12:], rtol=0, atol=1e-10)
    np.testing.assert_allclose(model.forward(ids[12:], cache=cache, mask="full"), full[12:], rtol=0, atol=1e-10)
    assert cache.n_past == 12 and all(np.array_equal(a, b) for a, b in zip(cache.k, snapshot.k))
    # commit everything, roll back into the middle of block 2 (entries 8, 9 stay valid while block 2 is unedited)
    model.forward(ids[12:], cache=cache, commit=True)
    cache.rollback(10)
    assert cache.n_past == 10 and cache.positions.tolist() == list(range(10))
    np.testing.assert_allclose(model.forward(ids[10:], cache=cache), full[10:], rtol=0, atol=1e-10)
    # roll back to the block boundary and recompute blocks 2, 3 with an edited token
    cache.rollback(8)
    edited = ids.copy()
    edited[11] = (edited[11] + 3) % VOCAB
    np.testing.assert_allclose(model.forward(edited[8:], cache=cache), model.forward(edited)[8:], rtol=0, atol=1e-10)
    np.testing.assert_allclose(model.forward(ids[8:], cache=cache), full[8:], rtol=0, atol=1e-10)
    # explicit positions give the same answer as the default ones
    np.testing.assert_array_equal(model.forward(ids[8:], np.arange(8, 16), cache=cache),
                                  model.forward(ids[8:], cache=cache))


def test_cache_copy_is_independent():
    model, _ = make_model()
    cache = model.new_cache()
    with pytest.raises(UsageError):
        model.forward(tokens(4), commit=True)
    model.forward(tokens(8), cache=cache, commit=True)
    other = cache.copy()
    other.rollback(0)
    other.k[0] = other.k[0] * 0
    assert other.n_past == 0 and cache.n_past == 8 and np.abs(cache.k[0]).max() > 0


# ---------------------------------------------------------------- routing

def _route(logits, bias=None, **kw):
    """Route with an identity router, so ``logits`` are the router logits themselves."""
    x = np.asarray(logits, dtype=np.float64)
    return route(x, np.eye(x.shape[-1]), None if bias is None else np.asarray(bias, dtype=np.float64), **kw)


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))


# four groups of two: {0,1} {2,3} {4,5} {6,7}. Expert 4 (3.0) and expert 0 (2.0) are the best single experts,
# but their groups score .953+.018 and .881+.047, below group 1 (.818+.802) and group 3 (.622+.599).
ROUTER_LOGITS = [2.0, -3.0, 1.5, 1.4, 3.0, -4.0, 0.5, 0.4]


def test_route_group_limit_excludes_best_single_experts():
    r = _route([ROUTER_LOGITS], n_expert_used=2, n_group=4, n_group_used=2, expert_scale=2.5)
    assert r.ids.tolist() == [[2, 3]]
    s = _sigmoid([1.5, 1.4])
    np.testing.assert_allclose(r.weights[0], 2.5 * s / s.sum(), rtol=1e-15)
    plain = _route([ROUTER_LOGITS], n_expert_used=2, n_group=1, n_group_used=1, expert_scale=2.5)
    assert plain.ids.tolist() == [[4, 0]]


def test_route_bias_changes_selection_not_weights():
    bias = [0, 0, 0, 0, 0, 0, 0, 0.5]  # expert 7: selection score .599 + .5 = 1.099 lifts group 3 to first place
    r = _route([ROUTER_LOGITS], bias, n_expert_used=2, n_group=4, n_group_used=2, expert_scale=2.5)
    assert r.ids.tolist() == [[7, 2]]
    s = _sigmoid([0.4, 1.5])  # the ORIGINAL sigmoid scores, no bias
    np.testing.assert_allclose(r.weights[0], 2.5 * s / s.sum(), rtol=1e-15)
    # a bias that does not change the choice leaves the weights exactly as without it
    small = _route([ROUTER_LOGITS], [0.01] * 8, n_expert_used=2, n_group=4, n_group_used=2, expert_scale=2.5)
    unbiased = _route([ROUTER_LOGITS], n_expert_used=2, n_group=4, n_group_used=2, expert_scale=2.5)
    assert small.ids.tolist() == unbiased.ids.tolist()
    np.testing.assert_array_equal(small.weights, unbiased.weights)


def test_route_per_token_unnormalised_and_floor():
    rows = [ROUTER_LOGITS, ROUTER_LOGITS[::-1], [-20.0] * 4 + [-19.0] * 4]
    r = _route(rows, n_expert_used=2, n_group=4, n_group_used=2, expert_norm=False, expert_scale=2.0)
    assert r.ids.tolist() == [[2, 3], [5, 4], [4, 5]]
    np.testing.assert_allclose(r.weights[0], 2.0 * _sigmoid([1.5, 1.4]), rtol=1e-15)
    tiny = _route(rows[2:], n_expert_used=2, n_group=4, n_group_used=2, expert_scale=1.0)
    s = _sigmoid([-19.0, -19.0])  # sum ~1.1e-8 < 2^-14: llama.cpp's floor applies, weights do not sum to 1
    np.testing.assert_allclose(tiny.weights[0], s / WEIGHT_SUM_FLOOR, rtol=1e-12)


def test_expert_union_matches_routes():
    model, _ = make_model("groups4-dense1-d32")
    model.forward(tokens(8))
    touched = expert_union(model.last_routes)
    assert sorted(touched) == list(range(model.cfg.n_dense, model.cfg.n_layer))
    for i, ex in touched.items():
        assert ex.tolist() == sorted(set(model.last_routes[i].ids.ravel().tolist()))
        assert model.last_routes[i].ids.shape == (8, 3)


# ---------------------------------------------------------------- RoPE

def test_rope_partial_neox_properties():
    rng = np.random.default_rng(3)
    q, k = rng.standard_normal((2, 1, 1, 16))
    rot = lambda x, p: rope_neox(x, np.array([p]), 8, 10000.0)  # noqa: E731
    np.testing.assert_array_equal(rot(q, 5)[..., 8:], q[..., 8:])  # dims past rope_dim untouched
    np.testing.assert_allclose(np.linalg.norm(rot(q, 5)), np.linalg.norm(q), rtol=1e-14)
    d1 = np.sum(rot(q, 7) * rot(k, 3))
    d2 = np.sum(rot(q, 104) * rot(k, 100))  # only the offset matters
    np.testing.assert_allclose(d1, d2, rtol=1e-12)
    np.testing.assert_array_equal(rot(q, 0), q)


# ---------------------------------------------------------------- loaders and numerics

def write_gguf(path, hf: dict, w: dict, qtype=None) -> None:
    """A GGUF in our converter's layout (spec §2.1), written here so this test does not depend on it."""
    cfg = config_from_hf(hf, block_length=B)
    weights = hf_to_weights(lambda n, dt: w[n].astype(dt), set(w), cfg, np.float32)
    writer = gguf.GGUFWriter(str(path), K.ARCH)
    for key, val in [(K.EMBEDDING_LENGTH, cfg.hidden), (K.BLOCK_COUNT, cfg.n_layer), (K.HEAD_COUNT, cfg.n_head),
                     (K.HEAD_COUNT_KV, cfg.n_head_kv), (K.KEY_LENGTH, cfg.head_dim), (K.VALUE_LENGTH, cfg.head_dim),
                     (K.ROPE_DIM, cfg.rope_dim), (K.LEADING_DENSE, cfg.n_dense), (K.EXPERT_COUNT, cfg.n_expert),
                     (K.EXPERT_USED, cfg.n_expert_used), (K.EXPERT_GROUPS, cfg.n_group),
                     (K.EXPERT_GROUPS_USED, cfg.n_group_used), (K.EXPERT_GATING, K.GATING_SIGMOID),
                     (K.VOCAB_SIZE, cfg.n_vocab), (K.BLOCK_LENGTH, B), (K.MASK_ID, 7)]:
        writer.add_uint32(key, val)
    for key, val in [(K.ROPE_FREQ_BASE, cfg.rope_theta), (K.RMS_EPS, cfg.eps), (K.EXPERT_SCALE, cfg.expert_scale)]:
        writer.add_float32(key, val)
    writer.add_bool(K.EXPERT_NORM, cfg.expert_norm)
    for name, arr in weights.items():
        if qtype is not None and arr.ndim >= 2 and arr.shape[-1] % 32 == 0:
            writer.add_tensor(name, gguf.quants.quantize(arr, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(name, arr)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf")
    hf = write_checkpoint(d, tiny_config(**CONFIGS["groups4-dense1-d32"]), seed=5, head_scale=3.0)
    return d, hf


def test_hf_and_gguf_loaders_agree(hf_dir, tmp_path):
    d, hf = hf_dir
    ref = load_hf(d, block_length=B)
    assert ref.cfg.mask_id is not None and ref.cfg.n_vocab == hf["vocab_size"]
    from converters.safetensors import Checkpoint
    w = dict(Checkpoint(d).items(np.float32))
    write_gguf(tmp_path / "m.gguf", hf, w)
    gg = load_gguf(tmp_path / "m.gguf")
    assert gg.cfg == ref.cfg.__class__(**{**ref.cfg.__dict__, "mask_id": 7})
    assert sorted(gg.weights) == sorted(ref.weights)
    ids = np.arange(12) % hf["vocab_size"]
    np.testing.assert_array_equal(gg.forward(ids), ref.forward(ids))


def test_quantized_gguf_is_dequantized(hf_dir, tmp_path):
    d, hf = hf_dir
    from converters.safetensors import Checkpoint
    w = dict(Checkpoint(d).items(np.float32))
    write_gguf(tmp_path / "q.gguf", hf, w, qtype=gguf.GGMLQuantizationType.Q8_0)
    ref, q = load_hf(d, block_length=B), load_gguf(tmp_path / "q.gguf")
    qkv = "blk.0.attn_qkv.weight"
    assert q.weights[qkv].shape == ref.weights[qkv].shape and not np.array_equal(q.weights[qkv], ref.weights[qkv])
    np.testing.assert_allclose(q.weights[qkv], ref.weights[qkv], atol=0.02)
    a, b = q.forward(np.arange(8)), ref.forward(np.arange(8))
    assert np.abs(a - b).max() < 0.05 * np.abs(b).max()


def test_gguf_with_wrong_architecture_is_refused(tmp_path):
    writer = gguf.GGUFWriter(str(tmp_path / "x.gguf"), "llama")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelError, match="architecture"):
        load_gguf(tmp_path / "x.gguf")


def test_float32_agrees_with_float64():
    m64, _ = make_model("groups2-dense1-d16", np.float64)
    m32, _ = make_model("groups2-dense1-d16", np.float32)
    ids = tokens(12)
    a, b = m32.forward(ids), m64.forward(ids)
    assert a.dtype == np.float32 and m32.new_cache().k[0].dtype == np.float32
    assert np.abs(a - b).max() < 1e-4 * max(1.0, np.abs(b).max())


@pytest.mark.parametrize("outtype", ["f32", "q8_0"])
def test_converter_output_matches_hf(hf_dir, tmp_path, outtype):
    """The real converter's GGUF loads into the same model (bit-identical at f32)."""
    from converters import convert
    d, hf = hf_dir
    out = tmp_path / f"m-{outtype}.gguf"
    convert(d, out, outtype=outtype, model_version="2.1", warn=lambda msg: None)
    ref, gg = load_hf(d, block_length=B), load_gguf(out)
    assert gg.cfg.mask_id == ref.cfg.mask_id and gg.cfg.n_vocab == ref.cfg.n_vocab
    ids = np.arange(12) % hf["vocab_size"]
    if outtype == "f32":
        assert sorted(gg.weights) == sorted(ref.weights)
        assert gg.cfg == RefConfig(**{**ref.cfg.__dict__, "block_length": gg.cfg.block_length})
        np.testing.assert_array_equal(RefModel(ref.cfg, gg.weights).forward(ids), ref.forward(ids))
    else:
        a, b = RefModel(ref.cfg, gg.weights).forward(ids), ref.forward(ids)
        assert np.abs(a - b).max() < 0.05 * np.abs(b).max()
