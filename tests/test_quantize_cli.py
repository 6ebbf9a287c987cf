"""``dllm convert --quant``: K-quants and the MoE-aware preset through the patched llama_model_quantize."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import gguf
import pytest

DLLM = str(Path(sys.executable).with_name("dllm"))


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    from dllm_cli.demo.checkpoint import tiny_config, write_checkpoint

    d = tmp_path_factory.mktemp("quantcli")
    write_checkpoint(d / "ckpt", tiny_config(hidden_size=256, moe_intermediate_size=256, head_dim=64,
                                              intermediate_size=256), seed=2)
    return d


def types(path):
    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}


def dllm(*args):
    return subprocess.run([DLLM, *args], capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)


def test_checkpoint_to_q4_k_m_and_gguf_to_moe_preset(wide):
    out = wide / "m-q4_k_m.gguf"
    r = dllm("convert", str(wide / "ckpt"), "--quant", "q4_k_m", "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(out)
    t = types(out)
    assert t["blk.1.ffn_gate_exps.weight"] == "Q4_K" and t["blk.1.ffn_gate_inp.weight"] == "F32"
    assert not list(wide.glob(".dllm-quant-*")), "the temporary bf16 file must be cleaned up"

    f32 = wide / "m-f32.gguf"
    assert dllm("convert", str(wide / "ckpt"), "--outtype", "f32", "-o", str(f32)).returncode == 0
    moe = wide / "m-moe.gguf"
    r = dllm("convert", str(f32), "--quant", "q4_k_moe", "-o", str(moe))
    assert r.returncode == 0, r.stderr
    t = types(moe)
    assert t["blk.1.ffn_gate_exps.weight"] == "Q4_K" and t["blk.1.ffn_down_exps.weight"] == "Q5_K"
    assert t["blk.1.attn_qkv.weight"] == "Q8_0" and t["blk.1.ffn_up_shexp.weight"] == "Q8_0"
    assert t["output.weight"] == "Q8_0" and t["blk.1.exp_probs_b.bias"] == "F32"
    assert moe.stat().st_size > out.stat().st_size  # the 8-bit parts cost a little size

    r = dllm("convert", str(f32), "--quant", "q4_k_moe", "-o", str(moe))
    assert r.returncode == 1 and "--force" in r.stderr
    r = dllm("convert", str(f32), "--quant", "q3_bogus", "-o", str(wide / "x.gguf"))
    assert r.returncode == 2 and not (wide / "x.gguf").exists()
    r = dllm("convert", str(moe), "--quant", "q8_0", "-o", str(wide / "re.gguf"))
    assert r.returncode == 1 and "already quantized" in r.stderr and not (wide / "re.gguf").exists()
    assert not list(wide.glob("*.part"))
