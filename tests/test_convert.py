"""The LLaDA2 -> GGUF converter: round trips through GGUFReader, metadata, sources, errors, CLI streams.

Expected GGUF names are derived here from the spec §2.1 table independently of converters/llada2.py.
"""
from __future__ import annotations

import errno
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q, GGUFReader, TokenType, quants

import converters.base as base
from converters import convert
from converters.safetensors import Checkpoint, f32_to_bf16, bf16_to_f32, save_file
from dllm_cli import gguf_keys as K
from dllm_cli.cli.app import main
from dllm_cli.errors import ConvertError, OutputError, UsageError
from io_helpers import part_files, part_size

REPO = Path(__file__).resolve().parents[1]
DLLM = REPO / ".venv" / "bin" / "dllm"

CONFIGS = {
    "default": {},  # 4/2 heads, D=16, 2 groups keep 1, 1 dense layer
    "groups1-dense2-d8": dict(n_group=1, topk_group=1, first_k_dense_replace=2, head_dim=8, hidden_size=32,
                              num_key_value_heads=1,
                              num_hidden_layers=4),
    "groups4-heads8-d12": dict(num_attention_heads=8, num_key_value_heads=2, head_dim=12, hidden_size=96,
                               num_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4, num_shared_experts=2),
    "sharded-bf16": dict(shards=3, bf16=True),
}
_LAYER = {"input_layernorm.weight": "attn_norm", "attention.query_key_value.weight": "attn_qkv",
          "attention.query_layernorm.weight": "attn_q_norm", "attention.key_layernorm.weight": "attn_k_norm",
          "attention.dense.weight": "attn_output", "post_attention_layernorm.weight": "ffn_norm",
          "mlp.gate.weight": "ffn_gate_inp", "mlp.gate.expert_bias": "exp_probs_b"}
F32_ALWAYS = re.compile(r"(_norm\.weight|ffn_gate_inp\.weight|exp_probs_b\.bias)$")


def oracle(hf: str) -> tuple[str, int | None]:
    """HF name -> (GGUF name, expert index) per spec §2.1."""
    top = {"model.word_embeddings.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    if hf in top:
        return top[hf], None
    i, rest = re.match(r"model\.layers\.(\d+)\.(.+)$", hf).groups()
    if m := re.match(r"mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight$", rest):
        return f"blk.{i}.ffn_{m[2]}_exps.weight", int(m[1])
    if m := re.match(r"mlp\.shared_experts\.(gate|up|down)_proj\.weight$", rest):
        return f"blk.{i}.ffn_{m[1]}_shexp.weight", None
    if m := re.match(r"mlp\.(gate|up|down)_proj\.weight$", rest):
        return f"blk.{i}.ffn_{m[1]}.weight", None
    suffix = "bias" if rest.endswith("expert_bias") else "weight"
    return f"blk.{i}.{_LAYER[rest]}.{suffix}", None


def expected_tensors(ckpt_dir: Path) -> dict[str, np.ndarray]:
    """GGUF name -> float32 values in numpy order (experts stacked on axis 0), from the source files."""
    ck = Checkpoint(ckpt_dir)
    out: dict[str, np.ndarray] = {}
    experts: dict[str, dict[int, np.ndarray]] = {}
    for name in ck.names():
        g, e = oracle(name)
        if e is None:
            out[g] = ck.get(name)
        else:
            experts.setdefault(g, {})[e] = ck.get(name)
    for g, parts in experts.items():
        out[g] = np.stack([parts[e] for e in range(len(parts))])
    return out


def kv(reader: GGUFReader) -> dict:
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def no_outputs(*dirs: Path) -> bool:
    return not any(p.suffix in (".gguf", ".part") or p.name.endswith(".gguf.part")
                   for d in dirs if d.exists() for p in d.rglob("*"))


def run_cli(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["dllm", *map(str, args)])
    with pytest.raises(SystemExit) as ex:
        main()
    cap = capsys.readouterr()
    return ex.value.code, cap.out, cap.err


# ------------------------------------------------------------------ round trips


@pytest.mark.parametrize("case", CONFIGS)
def test_f32_round_trip_is_exact(case, make_checkpoint, tmp_path):
    overrides = dict(CONFIGS[case])
    ck = make_checkpoint(shards=overrides.pop("shards", 1), bf16=overrides.pop("bf16", False), **overrides)
    out = convert(ck, tmp_path / "m.gguf", outtype="f32").path
    want = expected_tensors(ck)
    got = {t.name: t for t in GGUFReader(out).tensors}
    assert sorted(got) == sorted(want)
    for name, ref in want.items():
        t = got[name]
        assert t.tensor_type == Q.F32, name
        assert tuple(int(x) for x in t.shape) == tuple(reversed(ref.shape)), name  # ggml ne = reversed numpy
        np.testing.assert_array_equal(np.asarray(t.data), ref, err_msg=name)
    cfg = json.loads((ck / "config.json").read_text())
    layers, dense = cfg["num_hidden_layers"], cfg["first_k_dense_replace"]
    assert len(got) == 3 + layers * 6 + dense * 3 + (layers - dense) * 8
    assert got["blk.%d.ffn_down_exps.weight" % dense].shape.tolist() == [
        cfg["moe_intermediate_size"], cfg["hidden_size"], cfg["num_experts"]]


@pytest.mark.parametrize("outtype,qtype", [("f16", Q.F16), ("bf16", Q.BF16), ("q8_0", Q.Q8_0)])
def test_lossy_outtypes_keep_norms_and_router_f32(outtype, qtype, make_checkpoint, tmp_path):
    ck = make_checkpoint()
    out = convert(ck, tmp_path / "m.gguf", outtype=outtype).path
    reader = GGUFReader(out)
    want = expected_tensors(ck)
    for t in reader.tensors:
        ref = want[t.name]
        vals = quants.dequantize(t.data, t.tensor_type)
        assert vals.shape == ref.shape, t.name
        if ref.ndim == 1 or F32_ALWAYS.search(t.name):
            assert t.tensor_type == Q.F32, t.name
            np.testing.assert_array_equal(vals, ref, err_msg=t.name)
        elif qtype == Q.BF16:
            assert t.tensor_type == Q.BF16
            np.testing.assert_array_equal(vals, bf16_to_f32(f32_to_bf16(ref)), err_msg=t.name)
        elif qtype == Q.F16:
            assert t.tensor_type == Q.F16
            np.testing.assert_array_equal(vals, ref.astype(np.float16).astype(np.float32), err_msg=t.name)
        else:
            assert t.tensor_type == Q.Q8_0
            # per block d = amax/127 stored as f16: |error| <= d/2 + 127·|d - f16(d)| <= 0.562·d
            d = np.abs(ref).reshape(-1, 32).max(axis=1, keepdims=True) / 127
            assert np.all(np.abs(vals - ref).reshape(-1, 32) <= 0.57 * d + 1e-7), t.name
            assert np.abs(vals - ref).max() > 0  # really quantized
    assert kv(reader)["general.file_type"] == {"f16": 1, "bf16": 32, "q8_0": 7}[outtype]


def test_bf16_source_to_bf16_is_bit_exact(make_checkpoint, tmp_path):
    ck = make_checkpoint(bf16=True, shards=2)
    reader = GGUFReader(convert(ck, tmp_path / "m.gguf", outtype="bf16").path)
    want = expected_tensors(ck)
    for t in reader.tensors:
        np.testing.assert_array_equal(quants.dequantize(t.data, t.tensor_type), want[t.name], err_msg=t.name)


def test_q8_0_falls_back_to_f16_for_rows_not_a_multiple_of_32(make_checkpoint, tmp_path):
    ck = make_checkpoint(hidden_size=48, head_dim=12)  # every projection reading the hidden state has 48 columns
    types = {t.name: t.tensor_type for t in GGUFReader(convert(ck, tmp_path / "m.gguf", outtype="q8_0").path).tensors}
    assert types["blk.0.attn_qkv.weight"] == Q.F16
    assert types["blk.1.ffn_gate_exps.weight"] == Q.F16
    assert types["blk.1.ffn_down_exps.weight"] == Q.Q8_0  # 32 columns (moe_intermediate_size)


def test_small_chunks_give_identical_bytes(make_checkpoint, tmp_path, monkeypatch):
    ck = make_checkpoint(bf16=True)
    a = convert(ck, tmp_path / "a.gguf", outtype="q8_0").path.read_bytes()
    seen = []
    real = base.quants.quantize
    monkeypatch.setattr(base, "CHUNK_ELEMENTS", 100)
    monkeypatch.setattr(base.quants, "quantize", lambda x, q: seen.append(x.size) or real(x, q))
    b = convert(ck, tmp_path / "b.gguf", outtype="q8_0").path.read_bytes()
    assert a == b
    assert max(seen) <= 100 and len(seen) > 100  # streamed in blocks of rows


# ------------------------------------------------------------------ metadata


def test_metadata_keys(make_checkpoint, tmp_path):
    ck = make_checkpoint(name="LLaDA2.0-meta")
    out = convert(ck, tmp_path / "m.gguf", outtype="bf16").path
    got = kv(GGUFReader(out))
    cfg = json.loads((ck / "config.json").read_text())
    tok = json.loads((ck / "tokenizer.json").read_text())
    tcfg = json.loads((ck / "tokenizer_config.json").read_text())
    ids = {**tok["model"]["vocab"], **{a["content"]: a["id"] for a in tok["added_tokens"]}}
    v = cfg["vocab_size"]
    tokens = [next((s for s, i in ids.items() if i == n), f"[PAD{n}]") for n in range(v)]
    types = [int(TokenType.CONTROL) if any(a["id"] == n for a in tok["added_tokens"]) else
             int(TokenType.NORMAL) if n < len(ids) else int(TokenType.UNUSED) for n in range(v)]
    a = K.ARCH
    expected = {
        "general.architecture": a, "general.name": "LLaDA2.0-meta", "general.file_type": 32,
        "general.quantization_version": 2,
        f"{a}.context_length": 4096, f"{a}.embedding_length": 64, f"{a}.block_count": 3,
        f"{a}.feed_forward_length": 96, f"{a}.attention.head_count": 4, f"{a}.attention.head_count_kv": 2,
        f"{a}.attention.key_length": 16, f"{a}.attention.value_length": 16,
        f"{a}.attention.layer_norm_rms_epsilon": pytest.approx(1e-6), f"{a}.rope.freq_base": 600000.0,
        f"{a}.rope.dimension_count": 8, f"{a}.vocab_size": v, f"{a}.leading_dense_block_count": 1,
        f"{a}.expert_count": 8, f"{a}.expert_used_count": 2, f"{a}.expert_shared_count": 1,
        f"{a}.expert_feed_forward_length": 32, f"{a}.expert_shared_feed_forward_length": 32,
        f"{a}.expert_gating_func": 2, f"{a}.expert_weights_scale": 2.5, f"{a}.expert_weights_norm": True,
        f"{a}.expert_group_count": 2, f"{a}.expert_group_used_count": 1, f"{a}.nextn_predict_layers": 0,
        f"{a}.attention.causal": False, f"{a}.diffusion.shift_logits": False, f"{a}.diffusion.block_length": 32,
        K.MODEL_VERSION: "2.0", K.SOURCE: str(ck), K.REVISION: "", K.DLLM_VERSION: "0.1.0",
        K.preset_key("speed", "threshold"): pytest.approx(0.85), K.preset_key("speed", "editing_threshold"): 0.0,
        K.preset_key("speed", "max_post_steps"): 0, K.preset_key("speed", "editing"): False,
        K.preset_key("quality", "threshold"): pytest.approx(0.95), K.preset_key("quality", "editing_threshold"): 0.0,
        K.preset_key("quality", "max_post_steps"): 0, K.preset_key("quality", "editing"): False,
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "bailingmoe2", "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types, "tokenizer.ggml.merges": tok["model"]["merges"],
        "tokenizer.ggml.add_bos_token": False, "tokenizer.ggml.add_eos_token": False,
        K.MASK_ID: ids["<|mask|>"], K.EOS_ID: ids["<|endoftext|>"], K.PAD_ID: ids["<|endoftext|>"],
        K.BOS_ID: ids["<|startoftext|>"], K.EOT_ID: ids["<|role_end|>"], K.CHAT_TEMPLATE: tcfg["chat_template"],
    }
    assert got == expected
    assert got[K.MASK_ID] != got[K.EOT_ID]


def test_special_ids_are_resolved_by_string(make_checkpoint, tmp_path):
    ck = make_checkpoint()
    doc = json.loads((ck / "tokenizer.json").read_text())
    by = {t["content"]: t for t in doc["added_tokens"]}
    by["<|mask|>"]["id"], by["<|role_end|>"]["id"] = by["<|role_end|>"]["id"], by["<|mask|>"]["id"]
    (ck / "tokenizer.json").write_text(json.dumps(doc))
    got = kv(GGUFReader(convert(ck, tmp_path / "m.gguf").path))
    assert got[K.MASK_ID] == by["<|mask|>"]["id"] and got[K.EOT_ID] == by["<|role_end|>"]["id"]
    assert got["tokenizer.ggml.tokens"][got[K.MASK_ID]] == "<|mask|>"


@pytest.mark.parametrize("name,flag,name_or_path,want,warned", [
    ("LLaDA2.0-x", None, "a/LLaDA2.1-mini", "2.0", False),  # dir name before config _name_or_path
    ("plain", None, "a/LLaDA2.0-mini", "2.0", False),
    ("LLaDA2.0-x", "2.1", "a/b", "2.1", False),  # the flag wins
    ("plain", None, "a/model", "2.1", True),  # nothing to go on: default with a warning
])
def test_model_version_resolution(name, flag, name_or_path, want, warned, make_checkpoint, tmp_path):
    ck = make_checkpoint(name=name, _name_or_path=name_or_path)
    warnings: list[str] = []
    res = convert(ck, tmp_path / "m.gguf", model_version=flag, warn=warnings.append)
    assert res.model_version == want and kv(GGUFReader(res.path))[K.MODEL_VERSION] == want
    assert bool(warnings) == warned and (not warned or "--model-version" in warnings[0])


def test_default_output_goes_to_dllm_home(make_checkpoint, dllm_home):
    ck = make_checkpoint(name="mine")
    res = convert(ck, outtype="q8_0")
    assert res.path == dllm_home / "models" / "mine-q8_0.gguf" and res.path.is_file()


# ------------------------------------------------------------------ Hugging Face cache and aliases


def fake_hub(root: Path, repo: str, ckpt: Path, rev: str = "a" * 40) -> str:
    org, name = repo.split("/")
    d = root / "hub" / f"models--{org}--{name}"
    (d / "refs").mkdir(parents=True, exist_ok=True)
    snap = d / "snapshots" / rev
    snap.mkdir(parents=True)
    for f in ckpt.iterdir():
        (snap / f.name).write_bytes(f.read_bytes())
    (d / "refs" / "main").write_text(rev)
    return rev


def test_repo_id_from_offline_cache(make_checkpoint, tmp_path, monkeypatch, dllm_home):
    rev = fake_hub(tmp_path / "hf", "org/LLaDA2.0-tiny", make_checkpoint())
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    res = convert("org/LLaDA2.0-tiny")
    assert res.path == dllm_home / "models" / "llada2.0-tiny-bf16.gguf"
    got = kv(GGUFReader(res.path))
    assert (got[K.SOURCE], got[K.REVISION], got[K.MODEL_VERSION]) == ("org/LLaDA2.0-tiny", rev, "2.0")
    other = fake_hub(tmp_path / "hf", "org/LLaDA2.0-tiny", make_checkpoint(seed=5), rev="b" * 40)
    res2 = convert("org/LLaDA2.0-tiny", tmp_path / "pinned.gguf", revision=other)
    assert kv(GGUFReader(res2.path))[K.REVISION] == other


def test_alias_resolves_to_its_cached_repo(make_checkpoint, tmp_path, monkeypatch, dllm_home):
    fake_hub(tmp_path / "hf", "inclusionAI/LLaDA2.0-mini", make_checkpoint())  # tiny config says 2.1
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    res = convert("llada2.0-mini", outtype="f32")
    assert res.path == dllm_home / "models" / "llada2.0-mini-f32.gguf"
    got = kv(GGUFReader(res.path))
    assert (got[K.SOURCE], got[K.MODEL_VERSION], got["general.name"]) == ("inclusionAI/LLaDA2.0-mini", "2.0",
                                                                           "llada2.0-mini")


# ------------------------------------------------------------------ errors (CLI: exit code, message, no files)


def _drop_tensor(ck: Path, name: str | None = None, add: str | None = None, reshape: str | None = None) -> None:
    c = Checkpoint(ck)
    tensors = {n: c.get(n) for n in c.names() if n != name}
    if add:
        tensors[add] = np.zeros((2, 2), np.float32)
    if reshape:
        tensors[reshape] = tensors[reshape][:-1]
    c.files[0].close()
    save_file(tensors, ck / "model.safetensors")


def _edit_config(ck: Path, **changes) -> None:
    cfg = json.loads((ck / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k)
        else:
            cfg[k] = v
    (ck / "config.json").write_text(json.dumps(cfg))


BREAKAGES = {
    "missing config": (lambda ck: (ck / "config.json").unlink(), "config.json not found"),
    "unsupported arch": (lambda ck: _edit_config(ck, architectures=["BailingMoeV2ForCausalLM"]),
                         "unsupported architecture BailingMoeV2ForCausalLM (supported: LLaDA2MoeModelLM)"),
    "missing config key": (lambda ck: _edit_config(ck, n_group=None), "missing required key 'n_group'"),
    "missing tensor": (lambda ck: _drop_tensor(ck, "model.layers.2.mlp.experts.3.up_proj.weight"),
                       "missing tensor model.layers.2.mlp.experts.3.up_proj.weight (for blk.2.ffn_up_exps.weight)"),
    "extra tensor": (lambda ck: _drop_tensor(ck, add="model.layers.0.mlp.bogus.weight"),
                     "unmapped tensor model.layers.0.mlp.bogus.weight"),
    "mis-shaped tensor": (lambda ck: _drop_tensor(ck, reshape="model.layers.1.attention.dense.weight"),
                          "tensor model.layers.1.attention.dense.weight has shape [63, 64], expected [64, 64]"),
    "truncated safetensors": (lambda ck: os.truncate(ck / "model.safetensors",
                                                     (ck / "model.safetensors").stat().st_size - 10),
                              "truncated or corrupt safetensors file"),
    "corrupt safetensors": (lambda ck: (ck / "model.safetensors").write_bytes(b"\xff" * 64),
                            "corrupt safetensors file"),
    "missing tokenizer": (lambda ck: (ck / "tokenizer.json").unlink(), "tokenizer.json not found"),
    "no mask token": (lambda ck: (ck / "tokenizer.json").write_text(
        (ck / "tokenizer.json").read_text().replace("<|mask|>", "<|nomask|>")), "has no <|mask|> token"),
}


@pytest.mark.parametrize("case", BREAKAGES)
def test_bad_input_is_one_line_exit_1_and_leaves_nothing(case, make_checkpoint, tmp_path, monkeypatch, capsys):
    ck = make_checkpoint()
    breakage, message = BREAKAGES[case]
    breakage(ck)
    code, out, err = run_cli(monkeypatch, capsys, "convert", ck, "-o", tmp_path / "out" / "m.gguf")
    assert code == 1 and out == ""
    assert err.startswith("error: ") and message in err and err.count("\n") == 1 and "Traceback" not in err
    assert no_outputs(tmp_path, Path(os.environ["DLLM_HOME"]))


def test_unknown_alias_and_uncached_repo(monkeypatch, capsys, tmp_path):
    code, out, err = run_cli(monkeypatch, capsys, "convert", "llada9-huge")
    assert (code, out) == (1, "") and "unknown model alias 'llada9-huge'" in err and "llada2.1-mini" in err
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty"))
    code, out, err = run_cli(monkeypatch, capsys, "convert", "org/absent")
    assert (code, out) == (1, "") and "org/absent is not in the offline Hugging Face cache" in err
    assert "HF_HUB_OFFLINE" in err
    assert no_outputs(tmp_path, Path(os.environ["DLLM_HOME"]))


def test_existing_output_needs_force(make_checkpoint, tmp_path, monkeypatch, capsys):
    ck, out = make_checkpoint(), tmp_path / "m.gguf"
    out.write_bytes(b"keep me")
    code, stdout, err = run_cli(monkeypatch, capsys, "convert", ck, "-o", out)
    assert (code, stdout) == (1, "") and "already exists" in err and "--force" in err
    assert out.read_bytes() == b"keep me"
    code, stdout, _ = run_cli(monkeypatch, capsys, "convert", ck, "-o", out, "--force")
    assert (code, stdout) == (0, f"{out}\n") and out.read_bytes()[:4] == b"GGUF"
    assert not part_files(out)


@pytest.mark.parametrize("args,message", [(["--outtype", "q4_k"], "--outtype"),
                                          (["--model-version", "2.2"], "--model-version")])
def test_bad_flags_exit_2(args, message, make_checkpoint, tmp_path, monkeypatch, capsys):
    code, out, err = run_cli(monkeypatch, capsys, "convert", make_checkpoint(), "-o", tmp_path / "m.gguf", *args)
    assert (code, out) == (2, "") and message in err
    assert no_outputs(tmp_path)


def test_library_rejects_bad_arguments_as_usage_errors(make_checkpoint, tmp_path):
    with pytest.raises(UsageError):
        convert(make_checkpoint(), tmp_path / "m.gguf", outtype="q4_k")
    with pytest.raises(UsageError):
        convert(make_checkpoint(), tmp_path / "m.gguf", model_version="2.2")


def test_interrupt_mid_write_removes_partial_file(make_checkpoint, tmp_path):
    def stop(ev):
        if ev.done_tensors == 5:
            assert part_size(tmp_path / "m.gguf") > 0  # it really was being written
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        convert(make_checkpoint(), tmp_path / "m.gguf", progress=stop)
    assert list(tmp_path.iterdir()) == []


def test_disk_full_is_one_line_naming_the_file_and_removes_partial_file(make_checkpoint, tmp_path, monkeypatch):
    real = base.tensor_chunks

    def chunks(ck, plan):
        if plan.name == "blk.1.ffn_up_exps.weight":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(ck, plan)

    monkeypatch.setattr(base, "tensor_chunks", chunks)
    with pytest.raises(OutputError, match="cannot write the GGUF to .*m.gguf: no space left on the device"):
        convert(make_checkpoint(), tmp_path / "m.gguf")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ real process: stdout / stderr


def test_cli_process_streams(make_checkpoint, tmp_path):
    ck = make_checkpoint(name="plain", _name_or_path="x/y")
    env = {**os.environ, "DLLM_HOME": str(tmp_path / "home")}
    ok = subprocess.run([DLLM, "convert", ck, "--outtype", "f16"], capture_output=True, text=True, env=env)
    path = tmp_path / "home" / "models" / "plain-f16.gguf"
    assert (ok.returncode, ok.stdout) == (0, f"{path}\n")
    assert "warning:" in ok.stderr and "assuming 2.1" in ok.stderr and "wrote" in ok.stderr
    bad = subprocess.run([DLLM, "convert", tmp_path / "nowhere"], capture_output=True, text=True, env=env)
    assert (bad.returncode, bad.stdout) == (1, "") and bad.stderr.startswith("error: ")


def test_make_gguf_fixture_builds_a_loadable_model(make_gguf):
    path = make_gguf("q8_0", model_version="2.0", n_group=1, topk_group=1)
    got = kv(GGUFReader(path))
    assert (got["general.architecture"], got[K.MODEL_VERSION], got[f"{K.ARCH}.expert_group_count"]) == ("llada2", "2.0", 1)
