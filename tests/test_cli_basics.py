"""The CLI surface and the registry: --help, --version, dllm models, malformed models.toml, model resolution,
and the wheel carrying models.toml, the demo model and the patches."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from rich.cells import cell_len

from dllm_cli import __version__, registry
from dllm_cli.errors import ModelError, RegistryError

DLLM = str(Path(sys.executable).with_name("dllm"))
ROOT = Path(__file__).resolve().parents[1]


def dllm(*args):
    return subprocess.run([DLLM, *args], capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)


def test_help_lists_the_commands_and_version_prints():
    r = dllm("--help")
    assert r.returncode == 0
    for cmd in ("chat", "run", "convert", "bench", "models", "runtime"):
        assert cmd in r.stdout
    r = dllm("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"dllm {__version__}"


def test_models_lists_every_known_checkpoint_as_json():
    r = dllm("models", "--json")
    assert r.returncode == 0
    aliases = {m["alias"]: m for m in json.loads(r.stdout)}
    assert {"demo", "llada2.0-mini", "llada2.0-flash", "llada2.0-mini-cap", "llada2.0-flash-cap",
            "llada2.1-mini", "llada2.1-flash"} <= set(aliases)
    mini = aliases["llada2.1-mini"]
    assert mini["repo"] == "inclusionAI/LLaDA2.1-mini" and mini["version"] == "2.1"
    assert mini["presets"]["speed"] == {"threshold": 0.5, "editing_threshold": 0.0, "max_post_steps": 16, "editing": True,
                                        "indel": False}  # DELETE/INSERT only in the 2.2 presets
    assert mini["presets"]["quality"]["threshold"] == 0.7 and mini["presets"]["quality"]["editing_threshold"] == 0.5
    assert aliases["llada2.0-mini"]["presets"]["quality"]["editing"] is False
    r = dllm("models", "show", "llada2.0-flash")
    assert r.returncode == 0 and "inclusionAI/LLaDA2.0-flash" in r.stdout
    r = dllm("models", "show", "nope")
    assert r.returncode == 1 and "unknown model alias 'nope'" in r.stderr and r.stdout == ""


def models_table(columns: int) -> str:
    r = subprocess.run([DLLM, "models"], capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
                       env={**os.environ, "COLUMNS": str(columns)})
    assert r.returncode == 0 and r.stderr == "", r.stderr
    return r.stdout


def row_cells(out: str) -> dict[str, list[str]]:
    """alias -> the cells of its row (rows are the lines between │ borders)."""
    rows = [[c.strip() for c in ln.strip("│").split("│")] for ln in out.splitlines() if ln.startswith("│")]
    return {r[0]: r[1:] for r in rows}


@pytest.mark.parametrize("columns,shown,left_out", [
    (120, ["repo", "version", "params", "quant", "size GB", "local"], []),
    (80, ["version", "params", "quant", "size GB", "local"], ["repo"]),
    (60, ["version", "params", "local"], ["repo", "quant", "size GB"]),
])
def test_models_never_cuts_an_alias_and_leaves_out_columns_instead(columns, shown, left_out):
    out = models_table(columns)
    assert "…" not in out  # no cell is cut, aliases least of all
    assert all(cell_len(ln) <= columns for ln in out.splitlines()), out
    header = next(ln for ln in out.splitlines() if ln.startswith("┃"))
    assert [c.strip() for c in header.strip("┃").split("┃")] == ["alias", *shown], out
    rows = row_cells(out)
    assert list(rows) == list(registry.load_registry()), out  # every alias whole, in registry order
    assert rows["llada2.1-mini"][shown.index("version")] == "2.1" and rows["demo"][shown.index("params")] == "embedded"
    if left_out:
        assert f"not shown at this width: {', '.join(left_out)}" in " ".join(out.split()), out
    else:
        assert "not shown" not in out and rows["llada2.0-flash-cap"][0] == "inclusionAI/LLaDA2.0-flash-CAP"


def test_models_in_a_very_narrow_terminal_lists_the_aliases_alone():
    assert models_table(20).splitlines() == list(registry.load_registry())


def test_models_local_column_names_each_file_under_its_own_alias():
    store = registry.models_dir()
    store.mkdir(parents=True)
    for name in ("llada2.0-mini-q4_k_m.gguf", "llada2.0-mini-cap-bf16.gguf", "llada2.0-mini-cap-q8_0.gguf"):
        (store / name).write_bytes(b"GGUF")
    rows = row_cells(models_table(120))
    assert rows["llada2.0-mini"][-1] == "q4_k_m" and rows["llada2.0-mini-cap"][-1] == "bf16, q8_0"
    assert rows["llada2.1-mini"][-1] == "-" and rows["demo"][-1] == "embedded"


@pytest.mark.parametrize("edit,needle", [
    (lambda t: t.replace('recommended_quant = "q4_k_m"', 'recommended_quant = "q4_k_m"\nfoo = 1', 1), "unknown key models."),
    (lambda t: t.replace('version = "2.1"\nparams_total = "16.26B"', 'params_total = "16.26B"', 1), ".version"),
    (lambda t: t.replace("threshold = 0.5\n", "threshold = \"high\"\n", 1), "presets.2.1.speed.threshold"),
    (lambda t: t + "\n[models.x\n", "not valid TOML"),
])
def test_malformed_registry_names_the_key(tmp_path, edit, needle):
    bad = tmp_path / "models.toml"
    bad.write_text(edit((ROOT / "models.toml").read_text()))
    with pytest.raises(RegistryError) as e:
        registry.load_registry(bad)
    assert needle in str(e.value)


def test_model_resolution(tmp_path, monkeypatch):
    assert registry.resolve_model(None) == registry.embedded_model_path()  # the demo model by default
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF")
    monkeypatch.setenv("DLLM_MODEL", str(f))
    assert registry.resolve_model(None) == f
    with pytest.raises(ModelError, match="dllm convert llada2.1-mini"):
        registry.resolve_model("llada2.1-mini")
    store = registry.models_dir()
    store.mkdir(parents=True)
    (store / "llada2.1-mini-q8_0.gguf").write_bytes(b"GGUF")
    (store / "llada2.1-mini-q4_k_m.gguf").write_bytes(b"GGUF")
    assert registry.resolve_model("llada2.1-mini").name == "llada2.1-mini-q4_k_m.gguf"  # the recommended quant
    (store / "llada2.0-mini-cap-q4_k_m.gguf").write_bytes(b"GGUF")  # another alias's file, named with a longer alias
    with pytest.raises(ModelError, match="dllm convert llada2.0-mini"):
        registry.resolve_model("llada2.0-mini")
    assert registry.resolve_model("llada2.0-mini-cap").name == "llada2.0-mini-cap-q4_k_m.gguf"
    with pytest.raises(ModelError, match="model file not found"):
        registry.resolve_model(str(tmp_path / "missing.gguf"))
    with pytest.raises(ModelError, match="unknown model"):
        registry.resolve_model("gpt-5")


def test_wheel_carries_registry_demo_model_and_patches(tmp_path):
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
                       capture_output=True, text=True, timeout=600)
    if r.returncode != 0 and "hatchling" in r.stderr and "No matching distribution" in r.stderr:
        pytest.skip("hatchling is not reachable to build the wheel")
    assert r.returncode == 0, r.stderr[-2000:]
    names = zipfile.ZipFile(next(tmp_path.glob("dllm_cli-*.whl"))).namelist()
    assert "dllm_cli/models.toml" in names and "dllm_cli/demo/demo.gguf" in names
    assert any(n.startswith("ggml_patch/patches/") and n.endswith(".patch") for n in names)
    assert "converters/llada2.py" in names
