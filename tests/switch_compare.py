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
