"""Style rule 12: the library is type-hinted and the hints check clean (mypy, configured in pyproject.toml)."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(importlib.util.find_spec("mypy") is None,
                                reason="mypy is not installed (it comes with the `test` extra)")


def test_library_type_checks_clean():
    r = subprocess.run([sys.executable, "-m", "mypy", "dllm_cli", "converters", "ggml_patch"], cwd=ROOT,
                       capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, f"mypy exited {r.returncode}:\n{r.stdout}{r.stderr}"
