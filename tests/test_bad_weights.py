"""Weights that produce NaN/inf logits name the file (not "token -1 is outside the vocabulary"), and a q8_0 KV
cache on a head dimension that is not a multiple of 32 names the fix (f16/f32 KV), not "lower --ctx-size"."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader

from gguf_edit import rewrite

DLLM = str(Path(sys.executable).with_name("dllm"))


def _runtime_missing() -> str | None:
    from dllm_cli.errors import RuntimeMissingError
    from dllm_cli.runtime.library import check

    try:
        check()
    except RuntimeMissingError as e:
        return str(e)
    return None


pytestmark = pytest.mark.skipif(_runtime_missing() is not None, reason="no patched runtime")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from converters import convert
    from dllm_cli.demo.checkpoint import tiny_config, write_checkpoint

    d = tmp_path_factory.mktemp("weights")
    out = {}
    for head_dim, hidden in ((16, 64), (8, 32), (48, 192), (32, 128)):
        write_checkpoint(d / f"c{head_dim}", tiny_config(head_dim=head_dim, hidden_size=hidden), seed=2)
        out[head_dim] = convert(d / f"c{head_dim}", d / f"h{head_dim}.gguf", outtype="f32").path
    return out


def _dllm(*args: str, stdin: bytes = b"") -> subprocess.CompletedProcess:
    return subprocess.run([DLLM, *args], capture_output=True, timeout=120, input=stdin,
                          env=dict(os.environ, DLLM_DEBUG="0"))


def _poison(src: Path, dst: Path, name: str, value: float, rows: slice = slice(None)) -> Path:
    data = np.array(next(t.data for t in GGUFReader(src).tensors if t.name == name), dtype=np.float32)
    data[rows] = value
    return rewrite(src, dst, tensors={name: data})


POISON = {
    "output norm NaN": ("output_norm.weight", np.nan, slice(None)),
    "lm head inf": ("output.weight", np.inf, slice(None)),
    "lm head -inf half": ("output.weight", -np.inf, slice(0, None, 2)),
    "embeddings NaN": ("token_embd.weight", np.nan, slice(None)),
    "attention norm inf": ("blk.0.attn_norm.weight", np.inf, slice(None)),
    "dense ffn NaN": ("blk.0.ffn_down.weight", np.nan, slice(None)),
    "final layer norm huge": ("output_norm.weight", 3e38, slice(None)),
}


@pytest.mark.parametrize("case", list(POISON))
@pytest.mark.parametrize("mode", ["speed", "quality"])
def test_non_finite_logits_name_the_file(models, tmp_path, case, mode):
    name, value, rows = POISON[case]
    bad = _poison(models[16], tmp_path / "nan.gguf", name, value, rows)
    r = _dllm("run", str(bad), "hello there", "--max-tokens", "8", "--mode", mode)
    err = r.stderr.decode()
    assert r.returncode == 1 and r.stdout == b"", (r.returncode, err[-1000:])
    assert len(err.strip().splitlines()) == 1 and "non-finite" in err and str(bad) in err, err
    assert "outside the vocabulary" not in err and "internal error" not in err


@pytest.mark.parametrize("device_confidence", [True, False])
def test_session_step_checks_what_it_reads(models, tmp_path, device_confidence):
    from dllm_cli.errors import ModelError
    from dllm_cli.runtime.model import Model
    from dllm_cli.runtime.session import Session
    from dllm_cli.runtime.options import RuntimeOptions

    bad = _poison(models[16], tmp_path / "nan.gguf", "output_norm.weight", np.nan)
    opts = RuntimeOptions(threads=1, ctx_size=64)
    with Model(bad, opts) as model, Session(model, opts, device_confidence=device_confidence) as s:
        block = [model.mask_id] * s.block_length
        with pytest.raises(ModelError, match="non-finite"):
            s.step(block, 0, range(4))
        assert s.cached == []


@pytest.mark.parametrize("head_dim", [16, 8, 48])
@pytest.mark.parametrize("command", ["run", "chat"])
def test_q8_0_kv_on_a_head_dim_not_a_multiple_of_32_names_the_fix(models, head_dim, command):
    args = ["run", str(models[head_dim]), "hi"] if command == "run" else ["chat", str(models[head_dim])]
    r = _dllm(*args, "--kv-type", "q8_0", stdin=b"hi\n")
    err = r.stderr.decode()
    assert r.returncode == 2 and r.stdout == b"", (r.returncode, err[-1000:])
    assert len(err.strip().splitlines()) == 1 and "f16" in err and str(head_dim) in err, err
    assert "ctx-size" not in err


def test_q8_0_kv_on_head_dim_32_runs(models):
    r = _dllm("run", str(models[32]), "hi", "--kv-type", "q8_0", "--max-tokens", "8")
    assert r.returncode == 0, r.stderr.decode()[-1000:]
