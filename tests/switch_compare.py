"""End-to-end check of a CPU patch that claims bit-identical results: run ``moe_rows_child.py`` (logits of 1-, 3-,
5- and 32-token steps and an AR token, greedy tokens of quality and speed generation) once with the patch's switch
on and once with ``VAR=0`` (the runtime reads it once per process, hence the children), and compare."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

CHILD = Path(__file__).with_name("moe_rows_child.py")
KEYS = ("step1", "step3", "step5", "step32", "ar")


def tiny_moe(d: Path, seed: int) -> dict[str, Path]:
    """A 3-layer MoE LLaDA2 (1 dense layer, 8 experts, top-2, hidden 256, head_dim 64) in ``d``, as f32 and Q4_K_M
    GGUFs: ``{"f32": path, "q4_k_m": path}``."""
    from converters import convert
    from dllm_cli.demo.checkpoint import tiny_config, write_checkpoint
    from dllm_cli.runtime.quantize import quantize

    cfg = tiny_config(hidden_size=256, intermediate_size=512, moe_intermediate_size=256, head_dim=64)
    write_checkpoint(d / "ckpt", cfg, seed=seed, head_scale=2.0)
    f32 = convert(d / "ckpt", d / "m-f32.gguf", outtype="f32").path
    return {"f32": f32, "q4_k_m": quantize(f32, d / "m-q4_k_m.gguf", "q4_k_m")}


def child_outputs(model: Path, env: dict[str, str], out: Path, repack: bool = True) -> dict[str, np.ndarray]:
    res = subprocess.run([sys.executable, str(CHILD), str(model), str(out), "1" if repack else "0"],
                         env=dict(os.environ, **env), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    with np.load(out) as z:
        return dict(z)


def assert_switch_is_bit_identical(model: Path, var: str, tmp_path: Path) -> None:
    """Logits and greedy tokens of ``model`` with ``var`` unset and ``var=0`` are the same bits."""
    on = child_outputs(model, {}, tmp_path / "on.npz")
    off = child_outputs(model, {var: "0"}, tmp_path / "off.npz")
    for k in KEYS:
        assert 1.0 < np.abs(on[k]).max() < 100.0, k  # real logits, not zeros
        assert np.array_equal(on[k], off[k]), (k, np.abs(on[k] - off[k]).max())
    assert json.loads(str(on["tokens"])) == json.loads(str(off["tokens"]))
