"""Bad GGUFs never reach llama.cpp's asserts: every key type and hyper-parameter relation is checked first.

Each row edits a good tiny GGUF (``gguf_edit.rewrite``) and expects a ``ModelError`` naming the key or tensor,
from ``inspect_gguf`` (the gate of both loading and ``--quant``). The CLI rows check the whole path: exit 1,
one line on stderr, nothing on stdout, no output file. Without the fix these inputs abort the process (exit 134,
a gdb backtrace on stdout) or end in an internal error.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFValueType as T

from dllm_cli import gguf_keys as K
from dllm_cli.errors import ModelError
from dllm_cli.runtime.model import inspect_gguf
from gguf_edit import rewrite

DLLM = str(Path(sys.executable).with_name("dllm"))
A = K.ARCH


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    """Tiny model: 64 hidden, 4 heads x 16 (2 KV), 8 experts in 2 groups (use 1), top-2, 3 layers (1 dense)."""
    from converters import convert
    from dllm_cli.demo.checkpoint import tiny_config, write_checkpoint

    d = tmp_path_factory.mktemp("badmodel")
    write_checkpoint(d / "ckpt", tiny_config(), seed=3)
    return convert(d / "ckpt", d / "good.gguf", outtype="f32").path


# (edit, text the message must contain)
METADATA = {
    "expert_used > expert_count": ({K.EXPERT_USED: 64}, K.EXPERT_USED),
    "expert_used 0": ({K.EXPERT_USED: 0}, K.EXPERT_USED),
    "expert_count 0": ({K.EXPERT_COUNT: 0}, K.EXPERT_COUNT),
    "expert_count > 1024": ({K.EXPERT_COUNT: 2048}, K.EXPERT_COUNT),
    "expert_count not matching tensors": ({K.EXPERT_COUNT: 16, K.EXPERT_GROUPS: 4}, "ffn_gate_inp"),
    "groups 3 for 8 experts": ({K.EXPERT_GROUPS: 3}, K.EXPERT_GROUPS),
    "groups == experts": ({K.EXPERT_GROUPS: 8}, K.EXPERT_GROUPS),
    "groups > experts": ({K.EXPERT_GROUPS: 16}, K.EXPERT_GROUPS),
    "groups 4 of 2, use 4": ({K.EXPERT_GROUPS: 4, K.EXPERT_GROUPS_USED: 4}, K.EXPERT_GROUPS_USED),
    "group_used > groups": ({K.EXPERT_GROUPS_USED: 3}, K.EXPERT_GROUPS_USED),
    "group_used == groups": ({K.EXPERT_GROUPS_USED: 2}, K.EXPERT_GROUPS_USED),
    "group_used 0": ({K.EXPERT_GROUPS_USED: 0}, K.EXPERT_GROUPS_USED),
    "top-k beyond the used groups": ({K.EXPERT_USED: 6}, K.EXPERT_USED),
    "rope dims > head dim": ({K.ROPE_DIM: 64}, K.ROPE_DIM),
    "rope dims odd": ({K.ROPE_DIM: 7}, K.ROPE_DIM),
    "rope dims 0": ({K.ROPE_DIM: 0}, K.ROPE_DIM),
    "heads 0": ({K.HEAD_COUNT: 0}, K.HEAD_COUNT),
    "kv heads 0": ({K.HEAD_COUNT_KV: 0}, K.HEAD_COUNT_KV),
    "kv heads not dividing": ({K.HEAD_COUNT_KV: 3}, K.HEAD_COUNT_KV),
    "n_embd != heads x head dim": ({K.EMBEDDING_LENGTH: 65}, K.EMBEDDING_LENGTH),
    "key/value length differ": ({K.VALUE_LENGTH: 8}, K.VALUE_LENGTH),
    "key length not matching": ({K.KEY_LENGTH: 32, K.VALUE_LENGTH: 32}, K.EMBEDDING_LENGTH),
    "block_count 0": ({K.BLOCK_COUNT: 0}, K.BLOCK_COUNT),
    "block_count > 512": ({K.BLOCK_COUNT: 513}, K.BLOCK_COUNT),
    "block_count not matching": ({K.BLOCK_COUNT: 4}, "blk.3"),
    "dense layers > layers": ({K.LEADING_DENSE: 4}, K.LEADING_DENSE),
    "nextn layers": ({K.NEXTN_LAYERS: 1}, K.NEXTN_LAYERS),
    "shared experts 0": ({K.EXPERT_SHARED_COUNT: 0}, K.EXPERT_SHARED_COUNT),
    "expert ffn 0": ({K.EXPERT_FFN: 0}, K.EXPERT_FFN),
    "gating softmax": ({K.EXPERT_GATING: 1}, K.EXPERT_GATING),
    "gating unknown": ({K.EXPERT_GATING: 9}, K.EXPERT_GATING),
    "eps 0": ({K.RMS_EPS: 0.0}, K.RMS_EPS),
    "eps nan": ({K.RMS_EPS: float("nan")}, K.RMS_EPS),
    "rope base inf": ({K.ROPE_FREQ_BASE: float("inf")}, K.ROPE_FREQ_BASE),
    "causal": ({K.CAUSAL: True}, K.CAUSAL),
    "count as int32": ({K.EXPERT_COUNT: (8, T.INT32)}, K.EXPERT_COUNT),
    "count as string": ({K.BLOCK_COUNT: ("3", T.STRING)}, K.BLOCK_COUNT),
    "eps as uint32": ({K.RMS_EPS: (1, T.UINT32)}, K.RMS_EPS),
    "rope scaling unknown": ({f"{A}.rope.scaling.type": ("wobbly", T.STRING)}, "rope.scaling.type"),
    "vocab_size differs": ({K.VOCAB_SIZE: 10}, K.VOCAB_SIZE),
    "mask id outside the vocab": ({K.MASK_ID: 100000}, K.MASK_ID),
    "eos id outside the vocab": ({K.EOS_ID: 2**31}, K.EOS_ID),
    "mask id as string": ({K.MASK_ID: ("5", T.STRING)}, K.MASK_ID),
    "mask id == eos": ({K.EOS_ID: None}, K.EOS_ID),  # filled in by the test: eos := mask
    "tokenizer model": ({"tokenizer.ggml.model": ("llama", T.STRING)}, "tokenizer.ggml.model"),
    # dllm's own keys
    "block length 0": ({K.BLOCK_LENGTH: 0}, K.BLOCK_LENGTH),
    "block length huge": ({K.BLOCK_LENGTH: 2**31}, K.BLOCK_LENGTH),
    "block length as float": ({K.BLOCK_LENGTH: (32.0, T.FLOAT32)}, K.BLOCK_LENGTH),
    "threshold as string": ({K.preset_key("speed", "threshold"): ("0.5", T.STRING)}, "speed.threshold"),
    "threshold nan": ({K.preset_key("quality", "threshold"): float("nan")}, "quality.threshold"),
    "threshold > 1": ({K.preset_key("speed", "threshold"): 1.5}, "speed.threshold"),
    "threshold < 0": ({K.preset_key("speed", "editing_threshold"): -0.1}, "speed.editing_threshold"),
    "max_post_steps as float": ({K.preset_key("speed", "max_post_steps"): (1.5, T.FLOAT32)}, "max_post_steps"),
    "max_post_steps huge": ({K.preset_key("quality", "max_post_steps"): 2**31}, "max_post_steps"),
    "editing as string": ({K.preset_key("speed", "editing"): ("yes", T.STRING)}, "speed.editing"),
    "version unknown": ({K.MODEL_VERSION: ("3.7", T.STRING)}, K.MODEL_VERSION),
    "version as int": ({K.MODEL_VERSION: (2, T.UINT32)}, K.MODEL_VERSION),
    "template as int": ({K.CHAT_TEMPLATE: (7, T.UINT32)}, K.CHAT_TEMPLATE),
}
DROPS = {
    "no expert_count": (K.EXPERT_COUNT, K.EXPERT_COUNT),
    "no gating": (K.EXPERT_GATING, K.EXPERT_GATING),
    "no mask id": (K.MASK_ID, K.MASK_ID),
    "no embedding length": (K.EMBEDDING_LENGTH, K.EMBEDDING_LENGTH),
    "no tokens": ("tokenizer.ggml.tokens", "tokenizer.ggml.tokens"),
    "no merges": ("tokenizer.ggml.merges", "tokenizer.ggml.merges"),
    "half a preset": (K.preset_key("speed", "editing"), "speed.editing"),
}


def _expect(path: Path, needle: str) -> ModelError:
    with pytest.raises(ModelError) as info:
        inspect_gguf(path)
    msg = str(info.value)
    assert needle in msg and "\n" not in msg and str(path) in msg, msg
    return info.value


def test_the_good_file_passes(good):
    meta = inspect_gguf(good).meta
    assert (meta.block_length, meta.head_dim, meta.version) == (32, 16, "2.1")
    assert meta.presets is not None and meta.presets["quality"].threshold == 0.7  # the config value, not 0.699999988


@pytest.mark.parametrize("case", list(METADATA))
def test_bad_metadata_names_the_key(good, tmp_path, case):
    edit, needle = METADATA[case]
    edit = dict(edit)
    if edit.get(K.EOS_ID, 0) is None:
        edit[K.EOS_ID] = inspect_gguf(good).meta.mask_id
    _expect(rewrite(good, tmp_path / "bad.gguf", set=edit), needle)


@pytest.mark.parametrize("case", list(DROPS))
def test_missing_metadata_names_the_key(good, tmp_path, case):
    key, needle = DROPS[case]
    _expect(rewrite(good, tmp_path / "bad.gguf", drop=[key]), needle)


def test_duplicate_token_texts_are_refused(good, tmp_path):  # llama.cpp asserts id_to_token.size() == token_to_id.size()
    from gguf import GGUFReader

    tokens = list(GGUFReader(good).get_field("tokenizer.ggml.tokens").contents())
    tokens[5] = tokens[4]
    _expect(rewrite(good, tmp_path / "bad.gguf", set={"tokenizer.ggml.tokens": (tokens, T.ARRAY)}), "twice")


TENSORS = {
    "missing attention": ({"blk.1.attn_qkv.weight": None}, "blk.1.attn_qkv.weight"),
    "missing output": ({"output.weight": None}, "output.weight"),
    "qkv shape": ({"blk.0.attn_qkv.weight": np.zeros((100, 64), np.float32)}, "blk.0.attn_qkv.weight"),
    "embedding rows != vocab": ({"token_embd.weight": np.zeros((7, 64), np.float32)}, "token_embd.weight"),
    "expert stack": ({"blk.2.ffn_up_exps.weight": np.zeros((4, 32, 64), np.float32)}, "blk.2.ffn_up_exps.weight"),
    "integer weights": ({"blk.0.attn_output.weight": np.zeros((64, 64), np.int32)}, "blk.0.attn_output.weight"),
    "f16 norm": ({"blk.0.attn_norm.weight": np.ones(64, np.float16)}, "blk.0.attn_norm.weight"),
    "unexpected tensor": ({"blk.9.attn_norm.weight": np.ones(64, np.float32)}, "blk.9.attn_norm.weight"),
}


@pytest.mark.parametrize("case", list(TENSORS))
def test_bad_tensors_name_the_tensor(good, tmp_path, case):
    tensors, needle = TENSORS[case]
    _expect(rewrite(good, tmp_path / "bad.gguf", tensors=tensors), needle)


# --- through the real CLI: load and quantize ------------------------------------------------------------------
CLI_CASES = {
    "expert_used 64": {K.EXPERT_USED: 64},
    "expert_count 0": {K.EXPERT_COUNT: 0},
    "groups 3": {K.EXPERT_GROUPS: 3},
    "group_used 5": {K.EXPERT_GROUPS_USED: 5},
    "rope 64": {K.ROPE_DIM: 64},
    "block length 0": {K.BLOCK_LENGTH: 0},
    "threshold string": {K.preset_key("speed", "threshold"): ("fast", T.STRING)},
    "threshold nan": {K.preset_key("quality", "threshold"): float("nan")},
}


def _dllm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([DLLM, *args], capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
                          env=dict(os.environ, DLLM_DEBUG="0"))


@pytest.mark.parametrize("case", list(CLI_CASES))
@pytest.mark.parametrize("command", ["run", "quant"])
def test_cli_refuses_bad_models_in_one_line(good, tmp_path, case, command):
    bad = rewrite(good, tmp_path / "bad.gguf", set=CLI_CASES[case])
    out = tmp_path / "q.gguf"
    args = ["run", str(bad), "hello", "--max-tokens", "4"] if command == "run" else \
        ["convert", str(bad), "--quant", "q8_0", "-o", str(out)]
    r = _dllm(*args)
    assert r.returncode == 1, (r.returncode, r.stderr[-2000:])
    assert r.stdout == "" and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "internal error" not in r.stderr and str(bad) in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.gguf"]  # no q.gguf, no q.gguf.part


def test_native_abort_prints_no_backtrace_on_stdout(good, tmp_path):
    """Bypass the Python checks on purpose: llama.cpp aborts, but gdb's stack dump must not reach stdout."""
    from dllm_cli.runtime.library import check
    from dllm_cli.errors import RuntimeMissingError

    try:
        check()
    except RuntimeMissingError as e:
        pytest.skip(f"no patched runtime: {e}")
    bad = rewrite(good, tmp_path / "bad.gguf", set={K.EXPERT_USED: 64})
    code = ("import dllm_cli.runtime.library as L, sys; rt = L.load(); "
            "p = rt.lib.llama_model_default_params(); rt.lib.llama_model_load_from_file(sys.argv[1].encode(), p)")
    env = {k: v for k, v in os.environ.items() if k != "GGML_NO_BACKTRACE"}
    r = subprocess.run([sys.executable, "-c", code, str(bad)], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode != 0 and "GGML_ASSERT" in r.stderr  # it really aborted
    assert r.stdout == "", r.stdout[:500]
