"""The threading choice (issue 28): one thread per physical core by default, and a short libgomp barrier spin that
reaches libgomp itself (not a timing test: libgomp's own OMP_DISPLAY_ENV report is the evidence), unless the
user's environment already chose; the thread count reaches the llama.cpp context."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from dllm_cli.runtime import threads as T
from runtime_marks import needs_runtime


def _cpu(root: Path, n: int, siblings: str) -> None:
    d = root / f"cpu{n}" / "topology"
    d.mkdir(parents=True)
    (d / "core_cpus_list").write_text(siblings + "\n")


def test_physical_cores_counts_smt_siblings_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for n, sib in [(0, "0,2"), (1, "1,3"), (2, "0,2"), (3, "1,3")]:
        _cpu(tmp_path, n, sib)
    monkeypatch.setattr(T, "_cpus", lambda: [0, 1, 2, 3])
    assert T.physical_cores(tmp_path) == 2
    monkeypatch.setattr(T, "_cpus", lambda: [0, 2])  # an affinity mask of one core's two siblings
    assert T.physical_cores(tmp_path) == 1
    monkeypatch.setattr(T, "_cpus", lambda: [0, 1, 2, 3, 4])  # cpu4 has no topology: count logical CPUs
    assert T.physical_cores(tmp_path) == 5


def test_default_thread_count_is_the_physical_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    from dllm_cli.runtime.options import RuntimeOptions

    monkeypatch.setattr(T, "physical_cores", lambda: 3)
    assert RuntimeOptions().n_threads == 3
    assert RuntimeOptions(threads=5).n_threads == 5


def test_configure_wait_sets_a_short_spin_unless_the_environment_chose() -> None:
    env: dict[str, str] = {}
    w = T.configure_wait(env, gomp_loaded=False)
    assert env == {"GOMP_SPINCOUNT": str(T.DEFAULT_SPINCOUNT)} and w.source == "dllm default"
    assert T.DEFAULT_SPINCOUNT < 300000  # libgomp's own default is what spins away a busy machine
    env = {"OMP_WAIT_POLICY": "active"}
    w = T.configure_wait(env, gomp_loaded=False)
    assert env == {"OMP_WAIT_POLICY": "active"} and w.setting == "OMP_WAIT_POLICY=active" and w.source == "environment"
    env = {"GOMP_SPINCOUNT": "7"}
    assert T.configure_wait(env, gomp_loaded=False).setting == "GOMP_SPINCOUNT=7" and env == {"GOMP_SPINCOUNT": "7"}
    env = {}
    w = T.configure_wait(env, gomp_loaded=True)  # too late to matter: say so rather than pretend
    assert env == {} and w.source.startswith("ignored")


def _runtime_info(env_extra: dict[str, str]) -> tuple[dict, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    env.update(env_extra, OMP_DISPLAY_ENV="verbose")
    out = subprocess.run([str(Path(sys.executable).parent / "dllm"), "runtime", "info", "--json"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout), out.stderr


@needs_runtime
def test_the_spin_count_reaches_libgomp_and_runtime_info_shows_it() -> None:
    info, gomp = _runtime_info({})
    assert f"GOMP_SPINCOUNT = '{T.DEFAULT_SPINCOUNT}'" in gomp, gomp[-2000:]
    t = info["threads"]
    assert t["wait"] == f"GOMP_SPINCOUNT={T.DEFAULT_SPINCOUNT} (dllm default)"
    assert t["default_threads"] == T.default_threads() and t["logical_cpus"] >= t["physical_cores"] >= 1
    info, gomp = _runtime_info({"GOMP_SPINCOUNT": "1234"})
    assert "GOMP_SPINCOUNT = '1234'" in gomp and info["threads"]["wait"] == "GOMP_SPINCOUNT=1234 (environment)"


@needs_runtime
def test_the_thread_count_reaches_the_llama_context(make_gguf) -> None:
    from dllm_cli.runtime import options
    from dllm_cli.runtime.model import Model
    from dllm_cli.runtime.session import Session

    path = make_gguf("f32")
    for n in (1, 3, None):
        opts = replace(options.EXACT, ctx_size=64, threads=n)
        model = Model(path, opts)
        try:
            with Session(model, opts) as s:
                lib = model.rt.lib
                assert lib.llama_n_threads(s.ctx) == lib.llama_n_threads_batch(s.ctx) == (n or T.default_threads())
        finally:
            model.close()
