"""LLaDA2.2 (issue 13): converter recognition and keys, block routing in the numpy reference and in the patched
runtime (exact to 1e-4 under f32 weights, f32 KV, flash attention off), and 2.0/2.1 files unchanged byte for byte.

The tiny 2.2 checkpoint has 16 experts in 4 groups (top-2 groups), top-2 per token and a pool of C = 4 experts per
32-token routing block, so per-token routing in any block would pick far more than C distinct experts: the pool
binds. Tests check that skipping block routing, pooling the unbiased score or sharing one pool across blocks
all change the logits by far more than the tolerance (so they would fail a runtime that did any of these).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

import gguf
import numpy as np
import pytest

from converters import convert
from dllm_cli import gguf_keys as K
from dllm_cli.demo.checkpoint import random_weights, tiny_config, write_checkpoint
from dllm_cli.errors import ConvertError, ModelError, UsageError
from dllm_cli.reference import RefModel, load_gguf, load_hf, route
from dllm_cli.reference.forward import block_pool

B = 32
TOL = 1e-4
CAPACITY = 4
DELETE, SPLIT = "<|test_delete|>", "<|test_split|>"  # the real strings are unknown (docs/LLADA22.md)


def llada22_config(**over) -> dict:
    cfg = tiny_config(_name_or_path="tiny/LLaDA2.2-tiny", num_experts=16, n_group=4, topk_group=2,
                      expert_capacity=CAPACITY, block_size=B, delete_token_id=-1, split_token_id=-1,
                      max_position_embeddings=131072)
    cfg.update(over)
    return cfg


def write_llada22(d: Path, seed: int = 3, bias_scale: float = 1.0, edit_boost: float = 1.0, **over) -> dict:
    """A tiny 2.2 checkpoint: DELETE/SPLIT added to tokenizer.json at two padding ids, config pointing at them.

    ``edit_boost`` scales the output-head rows of DELETE and SPLIT, so that a random model predicts them often
    enough for the Levenshtein decoder's inserts and deletes to fire.
    """
    cfg = write_checkpoint(d, llada22_config(**over), seed=seed)  # learn the vocab size
    tok = json.loads((d / "tokenizer.json").read_text())
    first = max(t["id"] for t in tok["added_tokens"]) + 1
    assert first + 1 < cfg["vocab_size"]
    w = random_weights(cfg, seed, head_scale=2.0)
    for name in w:
        if name.endswith("expert_bias"):
            w[name] = w[name] * bias_scale  # the pooled score must matter: biased and unbiased pools differ
    w["lm_head.weight"][first:first + 2] *= edit_boost
    cfg = write_checkpoint(d, cfg, w)
    for i, text in enumerate((DELETE, SPLIT)):
        tok["added_tokens"].append({"id": first + i, "content": text, "single_word": False, "lstrip": False,
                                    "rstrip": False, "normalized": False, "special": True})
    (d / "tokenizer.json").write_text(json.dumps(tok))
    if over.get("delete_token_id", -1) == -1:
        cfg["delete_token_id"] = first
    if over.get("split_token_id", -1) == -1:
        cfg["split_token_id"] = first + 1
    for k in [k for k, v in over.items() if v is None]:
        cfg.pop(k)
    (d / "config.json").write_text(json.dumps(cfg, indent=1))
    return cfg


def kv(path) -> dict:
    out = {}
    for name, f in gguf.GGUFReader(path).fields.items():
        v = f.contents()
        out[name] = v.item() if isinstance(v, np.generic) else v
    return out


@pytest.fixture(scope="module")
def llada22(tmp_path_factory):
    d = tmp_path_factory.mktemp("llada22")
    cfg = write_llada22(d / "LLaDA2.2-tiny")
    path = convert(d / "LLaDA2.2-tiny", d / "tiny22-f32.gguf", outtype="f32").path
    return d / "LLaDA2.2-tiny", cfg, path


# --- converter -------------------------------------------------------------------------------------------------

def test_converts_with_version_routing_and_edit_keys(llada22):
    ckpt, cfg, path = llada22
    meta = kv(path)
    assert meta[K.MODEL_VERSION] == "2.2"
    assert meta[K.EXPERT_BLOCK_CAPACITY] == CAPACITY and meta[K.EXPERT_BLOCK_SIZE] == B
    assert meta[K.EXPERT_BLOCK_SCORE] == K.BLOCK_SCORE_BIASED
    assert meta[K.DELETE_ID] == cfg["delete_token_id"] and meta[K.SPLIT_ID] == cfg["split_token_id"]
    tokens = meta["tokenizer.ggml.tokens"]
    assert tokens[meta[K.DELETE_ID]] == DELETE and tokens[meta[K.SPLIT_ID]] == SPLIT
    assert tokens[meta[K.EOT_ID]] == "<|role_end|>"
    assert meta[K.STOP_IDS] == [meta[K.EOS_ID], meta[K.EOT_ID]]
    assert meta[K.CONTEXT_LENGTH] == 131072
    for mode in ("speed", "quality"):  # the Levenshtein decoder: T2T and DELETE/INSERT on in both modes
        assert meta[K.preset_key(mode, "editing")] is True and meta[K.preset_key(mode, "indel")] is True
    ref = load_gguf(path)
    assert (ref.cfg.expert_capacity, ref.cfg.routing_block) == (CAPACITY, B)
    hf = load_hf(ckpt)
    assert (hf.cfg.expert_capacity, hf.cfg.routing_block) == (CAPACITY, B)


@pytest.mark.parametrize("over, key", [
    ({"expert_capacity": None}, "expert_capacity"),
    ({"expert_capacity": 1}, "expert_capacity"),       # below num_experts_per_tok
    ({"expert_capacity": 17}, "expert_capacity"),      # above num_experts
    ({"block_size": None}, "block_size"),
    ({"block_size": 24}, "block_size"),                # does not divide the decode block
    ({"delete_token_id": None}, "delete_token_id"),
    ({"split_token_id": 200000}, "split_token_id"),    # no such token
])
def test_unconfirmed_or_inconsistent_22_config_fails_naming_the_key(tmp_path, over, key):
    write_llada22(tmp_path / "LLaDA2.2-x", **over)
    with pytest.raises(ConvertError) as e:
        convert(tmp_path / "LLaDA2.2-x", tmp_path / "x.gguf", outtype="f32")
    assert key in str(e.value)
    assert not (tmp_path / "x.gguf").exists()


def test_rope_scaling_is_refused_by_name(tmp_path):
    write_llada22(tmp_path / "LLaDA2.2-r", rope_scaling={"type": "yarn", "factor": 4.0})
    with pytest.raises(ConvertError, match="rope_scaling"):
        convert(tmp_path / "LLaDA2.2-r", tmp_path / "r.gguf", outtype="f32")


def test_version_flag_must_fit_the_config(tmp_path):
    write_llada22(tmp_path / "LLaDA2.2-v")
    with pytest.raises(UsageError, match="2.1"):
        convert(tmp_path / "LLaDA2.2-v", tmp_path / "v.gguf", outtype="f32", model_version="2.1")
    write_checkpoint(tmp_path / "plain", tiny_config())
    with pytest.raises(UsageError, match="expert_capacity"):
        convert(tmp_path / "plain", tmp_path / "p.gguf", outtype="f32", model_version="2.2")
    write_checkpoint(tmp_path / "LLaDA2.2-named", tiny_config(_name_or_path="x/LLaDA2.2-mini"))
    with pytest.raises(ConvertError, match="expert_capacity"):
        convert(tmp_path / "LLaDA2.2-named", tmp_path / "n.gguf", outtype="f32")


# 2.0/2.1 conversions are pinned: digests of every KV field (except the machine-dependent dllm.source and the
# package version dllm.version) and every tensor's name, type, shape, relative offset and bytes, computed with the
# converter as it was before issue 13 (commit e71b69f) on the same seeded checkpoint.
PINNED = {
    ("2.1", "f32"): "69d6c202a34662ffe8dc555c3c8b8e8b1eb12f01124fc6834f73421b46095c61",
    ("2.1", "bf16"): "2934dccc51c90044679837c1cca6616ab109281ad3d719c7ac381dfa4aee7f2a",
    ("2.1", "q8_0"): "251f82043e5e367ce28e5fdd5c9e0a9f394c06b59f61f214055d7b7d5836d4c8",
    ("2.0", "f32"): "47b53f24572d05baaf25bc30f3d018b6ec9a5e5e84749485611d16bd137d90e2",
    ("2.0", "bf16"): "8122d6de30a3ec0aeb55870941af1535d81bda64a7472e33d443e0ca3e06015e",
    ("2.0", "q8_0"): "ebdd505f8d2f293c5b5ddd60697277e6fd0fd1bc7236e9d06ac6efd706cc3c53",
}
VOLATILE = {K.SOURCE, K.DLLM_VERSION}


def file_digest(path) -> str:
    r = gguf.GGUFReader(path)
    h = hashlib.sha256()
    for name, f in r.fields.items():
        if name in VOLATILE:
            continue
        h.update(name.encode())
        for part in f.parts:
            h.update(bytes(memoryview(part).cast("B")))
    for t in r.tensors:
        h.update(t.name.encode())
        # offsets relative to the first tensor: the absolute ones move with the length of dllm.source
        h.update(str((int(t.tensor_type), t.shape.tolist(), int(t.data_offset) - int(r.tensors[0].data_offset))).encode())
        h.update(bytes(memoryview(t.data).cast("B")))
    return h.hexdigest()


@pytest.mark.parametrize("version", ["2.1", "2.0"])
def test_20_21_files_are_byte_identical_to_before(tmp_path, version):
    name = f"LLaDA{version}-tiny"
    write_checkpoint(tmp_path / name, tiny_config(_name_or_path=f"tiny/{name}"), seed=7)
    for outtype in ("f32", "bf16", "q8_0"):
        path = convert(tmp_path / name, tmp_path / f"{name}-{outtype}.gguf", outtype=outtype).path
        assert file_digest(path) == PINNED[(version, outtype)], (version, outtype)
        assert K.EXPERT_BLOCK_CAPACITY not in kv(path)


# --- numpy reference -------------------------------------------------------------------------------------------

def test_reference_block_pool_semantics():
    rng = np.random.default_rng(0)
    x, w, bias = rng.standard_normal((64, 8)), rng.standard_normal((16, 8)), 0.3 * rng.standard_normal(16)
    blocks = np.arange(64) // 32
    r = route(x, w, bias, n_expert_used=2, n_group=4, n_group_used=2, block_ids=blocks, capacity=4)
    s = 1 / (1 + np.exp(-(x @ w.T)))
    for b in (0, 1):
        rows = blocks == b
        pool = np.argsort(-(s + bias)[rows].max(0))[:4]
        assert set(np.unique(r.ids[rows])) <= set(pool)  # every choice inside the block's pool
        per_token = route(x[rows], w, bias, n_expert_used=2, n_group=1)
        assert len(np.unique(per_token.ids)) > 4  # the pool binds: per-token routing would touch more
    # inside the pool each token takes its own top-2 of the biased score, without the group restriction
    allowed = block_pool(s + bias, blocks, 4)
    want = np.argsort(-np.where(allowed, s + bias, -np.inf), axis=1, kind="stable")[:, :2]
    assert (r.ids == want).all()
    ws = np.take_along_axis(s, want, 1)
    assert np.allclose(r.weights, ws / ws.sum(1, keepdims=True))


# --- runtime ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def runtime22(llada22):
    from dllm_cli.runtime import options
    from dllm_cli.runtime.model import Model

    exact = replace(options.EXACT, ctx_size=512, ubatch=512, threads=2)
    _, _, path = llada22
    model = Model(path, exact)
    yield model, load_gguf(path, np.float64), exact
    model.close()


def variant(ref: RefModel, **cfg) -> RefModel:
    return RefModel(replace(ref.cfg, **cfg), ref.weights, ref.dtype)


def prompt(rng, n, model):
    return [int(t) for t in rng.integers(0, model.mask_id, size=n)]


def err(a, b) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).max())


def test_runtime_runs_block_routing(runtime22):
    model, _, _ = runtime22
    from dllm_cli.runtime.model import block_routing_capacity

    assert block_routing_capacity(model) == CAPACITY


def test_prefill_logits_match_reference_and_fail_without_block_routing(runtime22):
    from dllm_cli.runtime.session import Session

    model, ref, exact = runtime22
    ids = prompt(np.random.default_rng(1), 3 * B, model)  # three full routing blocks in one forward
    with Session(model, exact) as s:
        got = s.step(ids, 0, range(len(ids)), want_logits=True).logits
    want = ref.forward(np.asarray(ids))
    assert err(got, want) < TOL
    # the test has teeth: skipping block routing, pooling the unbiased score or one pool for the whole forward
    # (a pool leaking across blocks) all give other logits
    assert err(got, variant(ref, expert_capacity=0).forward(np.asarray(ids))) > 100 * TOL
    assert err(got, variant(ref, pool_score="unbiased").forward(np.asarray(ids))) > 100 * TOL
    assert err(got, variant(ref, pool_scope="forward").forward(np.asarray(ids))) > 100 * TOL


def test_steps_inside_a_block_after_a_prefill(runtime22):
    from dllm_cli.runtime.session import Session

    model, ref, exact = runtime22
    rng = np.random.default_rng(2)
    P = 70  # blocks 0-1 prefilled, block 2 = 6 prompt tokens + 26 masks
    ids = prompt(rng, P, model) + [model.mask_id] * (3 * B - P)
    leak = variant(ref, pool_scope="forward")
    with Session(model, exact) as s:
        s.commit(ids[:2 * B], 0)  # both prompt blocks in one decode: the pools must not leak between them
        for step in range(3):
            for i in rng.choice(range(P, 3 * B), size=5, replace=False):
                ids[i] = int(rng.integers(0, model.mask_id))
            got = s.step(ids[2 * B:], 2 * B, range(B), want_logits=True).logits
            want = ref.forward(np.asarray(ids))[2 * B:]
            assert err(got, want) < TOL, f"step {step}"
            assert err(got, variant(ref, expert_capacity=0).forward(np.asarray(ids))[2 * B:]) > 100 * TOL
        # a cache committed with one pool over both prompt blocks would give the leak model's logits
        assert err(got, _leaky_cached_logits(leak, ids)) > 100 * TOL


def _leaky_cached_logits(leak: RefModel, ids: list[int]) -> np.ndarray:
    """Block 2 logits over a cache whose two prompt blocks were computed with one shared pool."""
    cache = leak.new_cache()
    leak.forward(ids[:2 * B], cache=cache, commit=True)
    ok = RefModel(replace(leak.cfg, pool_scope="block"), leak.weights, leak.dtype)
    return ok.forward(ids[2 * B:], cache=cache)


def test_output_rows_subset_still_pools_over_the_whole_block(runtime22):
    from dllm_cli.runtime.session import Session

    model, ref, exact = runtime22
    rng = np.random.default_rng(4)
    ids = prompt(rng, B, model) + prompt(rng, 9, model) + [model.mask_id] * (B - 9)
    with Session(model, exact) as s:
        s.commit(ids[:B], 0)
        rows = [17, 3, 30]
        got = s.step(ids[B:], B, rows, want_logits=True).logits
    want = ref.forward(np.asarray(ids))[B:][rows]
    assert err(got, want) < TOL


def test_runtime_selects_the_reference_experts_and_the_pool_binds(runtime22):
    """The experts llama.cpp actually picked (read with the bench's cb_eval probe) are the reference's, at most C
    distinct per routing block, while per-token routing would touch more than C in every block and MoE layer."""
    from dllm_cli.bench.experts import ExpertProbe
    from dllm_cli.runtime.session import Session

    model, ref, exact = runtime22
    ids = prompt(np.random.default_rng(5), 2 * B, model)
    probe = ExpertProbe(model.rt)
    with Session(model, exact, eval_callback=probe.callback) as s:
        s.step(ids, 0, range(2 * B), want_logits=True)
    ref.forward(np.asarray(ids))
    moe_layers = [i for i, r in enumerate(ref.last_routes) if r is not None]
    assert sorted(probe.layers) == moe_layers
    per_token = variant(ref, expert_capacity=0)
    per_token.forward(np.asarray(ids))
    for il in moe_layers:
        got, want = np.sort(probe.layers[il], axis=1), np.sort(ref.last_routes[il].ids, axis=1)
        assert (got == want).all(), f"layer {il}"
        for b in range(2):
            rows = slice(b * B, (b + 1) * B)
            assert len(np.unique(got[rows])) <= CAPACITY
            assert len(np.unique(per_token.last_routes[il].ids[rows])) > CAPACITY


def test_a_build_without_block_routing_is_refused_in_one_line(runtime22, monkeypatch):
    from dllm_cli.runtime import model as M

    model, _, exact = runtime22
    monkeypatch.setattr(M, "block_routing_capacity", lambda m: None)  # the symbol of patch 0006 is absent
    with pytest.raises(ModelError) as e:
        M.Model(model.path, exact)
    msg = str(e.value)
    assert "\n" not in msg and "block routing" in msg and "dllm runtime build" in (e.value.hint or "")


def test_21_file_behaves_as_before(tmp_path):
    """A 2.1 file loads with per-token routing (capacity 0) and matches the unchanged reference."""
    from dllm_cli.runtime import options
    from dllm_cli.runtime.model import Model, block_routing_capacity
    from dllm_cli.runtime.session import Session

    exact = replace(options.EXACT, ctx_size=256, ubatch=256, threads=2)
    write_checkpoint(tmp_path / "ck", tiny_config(), seed=11, head_scale=2.0)
    path = convert(tmp_path / "ck", tmp_path / "t.gguf", outtype="f32").path
    ref = load_gguf(path, np.float64)
    assert ref.cfg.expert_capacity == 0
    ids = [int(t) for t in np.random.default_rng(6).integers(0, ref.cfg.mask_id, size=2 * B)]
    with Model(path, exact) as m, Session(m, exact) as s:
        assert block_routing_capacity(m) == 0
        got = s.step(ids, 0, range(2 * B), want_logits=True).logits
    assert err(got, ref.forward(np.asarray(ids))) < TOL


def test_dllm_run_produces_text_from_a_22_file(llada22):
    """The Levenshtein decoder runs a 2.2 file end to end with the 2.2 quality preset."""
    import subprocess
    import sys

    _, _, path = llada22
    dllm = str(Path(sys.executable).with_name("dllm"))
    r = subprocess.run([dllm, "run", str(path), "Sort 3 1 2", "--json", "--max-tokens", "40", "--mode", "quality"],
                       input=b"", capture_output=True, timeout=300)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["params"]["editing"] is True and doc["params"]["indel"] is True and doc["params"]["threshold"] == 0.9
    assert 0 < len(doc["tokens"]) <= 40 and isinstance(doc["text"], str) and doc["forwards"] > 0


def test_decode_blocks_must_tile_routing_blocks(runtime22):
    from dllm_cli.generate import decode_config

    model, _, _ = runtime22
    assert model.routing_block == B and model.version == "2.2"
    with pytest.raises(UsageError, match="block-length 16"):
        decode_config(model, "quality", block_length=16)
    assert decode_config(model, "quality", block_length=64).block_length == 64
    speed = decode_config(model, "speed")
    assert speed.editing and speed.indel and speed.threshold == 0.5
