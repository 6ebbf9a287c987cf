"""The runtime never compiles a CPU kernel path known to crash, and never loads a library built for another CPU.

Provable on any machine: the AMX opt-out is checked on the build flags, on what the compilers make of them under
an AMX target (``-march=sapphirerapids`` stands for ``-march=native`` on such a CPU), on the real compile command of
the installed build, and on the features the loaded library reports; the CPU fingerprint is checked on the cache
key and on the load-time refusal, with the host's features replaced.
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ggml_patch import build as B
from ggml_patch import cpu_features as C
from dllm_cli.errors import RuntimeMissingError
from dllm_cli.runtime import library

X86 = pytest.mark.skipif(not C.is_x86(), reason="AMX exists only on x86")
AMX_MACROS = ("__AMX_TILE__", "__AMX_INT8__", "__AMX_BF16__")


def _macros(compiler: str, flags: list[str]) -> set[str]:
    res = subprocess.run([compiler, *flags, "-dM", "-E", "-x", "c", os.devnull], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"{compiler} rejects {' '.join(flags)}: {res.stderr.strip()[:200]}")
    return {line.split()[1] for line in res.stdout.splitlines() if line.startswith("#define ")}


def _cmake_value(flags: list[str], name: str) -> list[str]:
    for f in flags:
        if f.startswith(f"-D{name}="):
            return f.split("=", 1)[1].split()
    return []


# --- build flags ------------------------------------------------------------------------------------------------
@X86
@pytest.mark.parametrize("backend", B.BACKENDS)
def test_default_build_disables_amx_in_c_and_cxx(backend):
    flags = B.cmake_flags(backend)
    for var in ("CMAKE_C_FLAGS", "CMAKE_CXX_FLAGS"):
        assert {"-mno-amx-tile", "-mno-amx-int8"} <= set(_cmake_value(flags, var)), (var, flags)
    on = B.cmake_flags(backend, amx=True)
    assert not any("amx" in f for f in on), "the --amx opt-in must drop the -mno-amx flags"
    assert B.cache_key(backend, on) != B.cache_key(backend, flags)


@X86
@pytest.mark.parametrize("compiler", ["cc", "c++"])
@pytest.mark.parametrize("order", ["before", "after"])
def test_compilers_honour_no_amx_under_an_amx_target(compiler, order):
    if not shutil.which(compiler):
        pytest.skip(f"no {compiler}")
    target = ["-march=sapphirerapids"]
    if not AMX_MACROS[1] in _macros(compiler, target):
        pytest.skip(f"{compiler} does not know AMX for sapphirerapids")
    off = _cmake_value(B.cmake_flags("cpu"), "CMAKE_CXX_FLAGS" if compiler == "c++" else "CMAKE_C_FLAGS")
    got = _macros(compiler, off + target if order == "before" else target + off)
    assert not got & set(AMX_MACROS), f"AMX still on with {off} {order} -march=sapphirerapids: {got & set(AMX_MACROS)}"
    assert "__AVX512VNNI__" in got, "only AMX is disabled, not the rest of the target"


@X86
def test_amx_flags_are_probed_not_assumed(monkeypatch):
    monkeypatch.setattr(C, "compiler_accepts", lambda compiler, flag: flag != "-mno-amx-fp16")
    assert "-mno-amx-fp16" not in C.amx_off_flags() and "-mno-amx-int8" in C.amx_off_flags()


def _installed_build() -> tuple[str, str, Path] | None:
    found = library.candidates("cpu")
    return found[0] if found else None


@X86
def test_installed_build_compiles_ggml_cpu_without_amx_on_an_amx_target():
    """The real ggml-cpu compile command of the installed build, with -march=native replaced by an AMX target."""
    found = _installed_build()
    if found is None:
        pytest.skip("no runtime built from the current patches (run `dllm runtime build`)")
    backend, key, _ = found
    # the build tree sits beside the runtime root when both live in the real DLLM_HOME (conftest keeps it)
    work = Path(os.environ["DLLM_RUNTIME_DIR"]).parent / "build" / f"{backend}-{key}" / "build"
    if not (work / "build.ninja").is_file() or not shutil.which("ninja"):
        pytest.skip(f"the build tree {work} is not kept here")
    cmds = subprocess.run(["ninja", "-C", str(work), "-t", "commands", "ggml-cpu"], capture_output=True, text=True).stdout
    line = next((c for c in cmds.splitlines() if "ggml-cpu.c.o" in c and "-o" in c), None)
    assert line, "no compile command for ggml-cpu.c"
    argv = shlex.split(line)
    compiler = argv[0]
    flags = [a for a in argv[1:] if a.startswith(("-m", "-D", "-f", "-O", "-std"))]
    assert "-march=native" in flags, "GGML_NATIVE builds for the host"
    flags = ["-march=sapphirerapids" if f == "-march=native" else f for f in flags]
    target = _macros(compiler, ["-march=sapphirerapids"])
    if "__AMX_INT8__" not in target:
        pytest.skip(f"{compiler} does not know AMX")
    assert not _macros(compiler, flags) & set(AMX_MACROS)


def test_loaded_library_reports_no_amx_and_lists_features():
    if _installed_build() is None:
        pytest.skip("no runtime built from the current patches (run `dllm runtime build`)")
    info = library.load().info()
    assert not info["amx"]
    assert not [f for f in info["cpu_compiled"] if f.startswith("AMX")], info["cpu_compiled"]
    if C.is_x86() and "avx2" in C.host_features():
        assert "AVX2" in info["cpu_compiled"], "a native build on an AVX2 host compiles AVX2"
    assert info["cpu_host"] == sorted(C.host_features())


def test_runtime_info_prints_compiled_and_host_features():
    if _installed_build() is None:
        pytest.skip("no runtime built from the current patches (run `dllm runtime build`)")
    res = subprocess.run([str(Path(sys.executable).with_name("dllm")), "runtime", "info", "--json"],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["amx"] is False and isinstance(doc["cpu_compiled"], list) and isinstance(doc["cpu_host"], list)


# --- CPU features and the cache key -------------------------------------------------------------------------------
CPUINFO_X86 = """processor\t: 0
vendor_id\t: GenuineIntel
flags\t\t: fpu vme sse sse2 ssse3 avx avx2 fma avx512f avx512_vnni amx_tile amx_int8 hypervisor tsc_known_freq
"""
CPUINFO_ARM = """processor\t: 0
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp asimddp sve i8mm bf16
"""


@pytest.mark.parametrize("text,want,not_want", [
    (CPUINFO_X86, {"avx2", "avx512_vnni", "amx_int8", "sse"}, {"hypervisor", "tsc_known_freq", "vme"}),
    (CPUINFO_ARM, {"asimddp", "sve", "i8mm", "bf16"}, set()),
    ("", set(), {"avx2"}),
])
def test_parse_cpuinfo_keeps_isa_features_only(text, want, not_want):
    got = C.parse_cpuinfo(text)
    assert want <= got and not (not_want & got)


def test_cache_key_includes_the_cpu_fingerprint():
    a = C.fingerprint(frozenset({"sse", "avx2"}), "x86_64")
    b = C.fingerprint(frozenset({"sse", "avx2", "avx512f"}), "x86_64")
    assert a != b and a == C.fingerprint(frozenset({"avx2", "sse"}), "x86_64")
    assert B.cache_key("cpu", cpu=a) != B.cache_key("cpu", cpu=b)
    assert B.cache_key("cpu") == B.cache_key("cpu", cpu=C.fingerprint())


@pytest.mark.parametrize("recorded,host,lacking", [
    (["avx2", "avx512f", "sse"], {"avx2", "sse"}, ["avx512f"]),
    (["avx2"], {"avx2", "avx512f"}, []),
    (None, {"sse"}, []),  # builds from before the fingerprint recorded nothing
    (["amx_int8", "amx_tile", "avx512_vnni"], set(), ["amx_int8", "amx_tile", "avx512_vnni"]),
])
def test_missing_features(recorded, host, lacking):
    assert C.missing(recorded, frozenset(host)) == lacking


def test_check_cpu_refuses_a_library_for_another_cpu(monkeypatch, tmp_path):
    monkeypatch.setattr(C, "host_features", lambda: frozenset({"sse", "sse2", "avx", "avx2"}))
    with pytest.raises(RuntimeMissingError) as err:
        library.check_cpu({"cpu_features": ["avx2", "avx512f", "avx512bw", "sse"]}, tmp_path)
    msg = str(err.value)
    assert "avx512bw, avx512f" in msg and "dllm runtime build" in msg and "\n" not in msg
    library.check_cpu({"cpu_features": ["avx2", "sse"]}, tmp_path)  # a subset is fine


_FOREIGN = """
import sys
from ggml_patch import cpu_features as C
C.host_features = lambda: frozenset({"sse", "sse2"})   # a CPU unlike the builder's
from dllm_cli.cli.app import main
sys.argv = ["dllm", *sys.argv[1:]]
main()
"""


@pytest.mark.parametrize("argv", [["run", "What is 2 + 3?"], ["runtime", "info"], ["chat", "--no-live"]])
def test_a_build_for_another_cpu_is_refused_with_one_line(argv):
    if _installed_build() is None:
        pytest.skip("no runtime built from the current patches (run `dllm runtime build`)")
    res = subprocess.run([sys.executable, "-c", _FOREIGN, *argv], capture_output=True, text=True, input="",
                         timeout=120)
    assert res.returncode == 1, res.stderr
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, res.stderr
    assert "other features" in lines[0] and "dllm runtime build" in lines[0]
    assert res.stdout == ""


def test_a_copied_library_is_refused_by_its_recorded_features(monkeypatch, tmp_path):
    """A runtime directory copied under this CPU's key (same name) but built elsewhere: build.json decides."""
    found = _installed_build()
    if found is None:
        pytest.skip("no runtime built from the current patches (run `dllm runtime build`)")
    backend, key, path = found
    root = tmp_path / "runtime"
    shutil.copytree(path, root / path.name, symlinks=True)
    info = json.loads((root / path.name / "build.json").read_text())
    info["cpu_features"] = sorted(set(info["cpu_features"]) | {"avx512_fp16", "amx_tile"})
    (root / path.name / "build.json").write_text(json.dumps(info))
    code = ("import sys\nfrom dllm_cli.runtime import library\n"
            "try:\n    library.load()\nexcept Exception as e:\n    print(type(e).__name__, e); sys.exit(1)\n")
    env = {**os.environ, "DLLM_RUNTIME_DIR": str(root)}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    missing = C.missing(info["cpu_features"])
    if not missing:
        pytest.skip("this CPU has every feature added to the copy")
    assert res.returncode == 1 and res.stdout.startswith("RuntimeMissingError") and "lacks" in res.stdout, res.stdout


def test_loading_does_not_depend_on_the_compiler_on_path(tmp_path):
    """The key of an installed build is checked against the flags it recorded, not a new compiler probe: a
    runtime built with cc still loads where $CC names another (or no) compiler, and no compiler is spawned."""
    if _installed_build() is None:
        pytest.skip("no runtime built from the current patches (run `dllm runtime build`)")
    env = {**os.environ, "CC": "no-such-cc", "CXX": "no-such-c++", "PATH": str(tmp_path)}
    res = subprocess.run([str(Path(sys.executable).with_name("dllm")), "runtime", "info", "--json"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["patchset"] == _installed_build()[1]


def test_a_build_with_other_flags_is_not_current(tmp_path, monkeypatch):
    found = _installed_build()
    if found is None:
        pytest.skip("no runtime built from the current patches (run `dllm runtime build`)")
    backend, key, path = found
    info = json.loads((path / "build.json").read_text())
    flags = [f for f in info["flags"] if f != "-DGGML_RPC=ON"]  # e.g. a build from before GGML_RPC was added
    other = B.cache_key(backend, flags)
    d = tmp_path / "rt" / f"{backend}-{other}"
    (d / "lib").mkdir(parents=True)
    (d / "build.json").write_text(json.dumps({**info, "key": other, "flags": flags}))
    monkeypatch.setenv("DLLM_RUNTIME_DIR", str(tmp_path / "rt"))
    assert library.candidates(backend) == []
