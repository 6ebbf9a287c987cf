"""Our CPU patches compile for every x86 CPU class and for 64-bit ARM, not only for the CPU this machine is.

The runtime is built with ``-march=native``, so a green run here proves the patched kernels only for this CPU. Each
patch keeps its AVX-512 / VNNI / AVX2 code behind feature macros with a generic fallback (0007, 0009, 0013, 0014,
0015); a guard that is wrong for another class (an intrinsic used outside its ``#if``, an always-inline mismatch)
breaks the build there. So each translation unit a CPU patch touches is compiled with the installed build's real
compile command, ``-march=native`` replaced by a baseline x86-64, AVX2 (x86-64-v3), AVX-512 without VNNI
(skylake-avx512), AVX-512 VNNI on AMD (znver4) and Intel with AMX (sapphirerapids; the build's AMX opt-out flags
stay), and, with Debian's aarch64 cross compilers, baseline ARMv8 NEON and ARMv8.2 with dot products and fp16 (the
class of Apple M1 and Graviton 2; the x86-only source left out, the AMX flags dropped). All at ``-O0`` to keep it
quick (always-inline and target mismatches are errors at any level).
"""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from ggml_patch import build as B
from ggml_patch import cpu_features as C
from dllm_cli.runtime import library

pytestmark = pytest.mark.skipif(not C.is_x86(), reason="cross-compiles from the x86 build's commands")

X86_TARGETS = ["x86-64", "x86-64-v3", "skylake-avx512", "znver4", "sapphirerapids"]
ARM_TARGETS = ["armv8-a", "armv8.2-a+dotprod+fp16"]
ARM_COMPILERS = {"cc": "aarch64-linux-gnu-gcc", "gcc": "aarch64-linux-gnu-gcc", "c++": "aarch64-linux-gnu-g++",
                 "g++": "aarch64-linux-gnu-g++"}
# the sources the CPU patches edit (0007/0009/0016/0017: both repack files; 0013: binary-ops; 0014: ggml-cpu.c; 0015: ops)
SOURCES = ["ggml-cpu.c", "ops.cpp", "binary-ops.cpp", "repack.cpp", "arch/x86/repack.cpp"]


def _patched_sources() -> set[str]:
    """The ggml-cpu sources the CPU build's patches touch, read from the patch files."""
    out = set()
    for patch in B.patch_files(backend="cpu"):
        for line in patch.read_text(errors="replace").splitlines():
            if line.startswith("+++ b/ggml/src/ggml-cpu/"):
                name = line.removeprefix("+++ b/ggml/src/ggml-cpu/")
                if name.endswith((".c", ".cpp")):  # headers are compiled through these
                    out.add(name)
    return out


def test_every_patched_cpu_source_is_compiled_here():
    assert _patched_sources() <= set(SOURCES), f"add to SOURCES: {_patched_sources() - set(SOURCES)}"


def _commands() -> dict[str, list[str]]:
    found = library.candidates("cpu")
    if not found:
        pytest.skip("no runtime built from the current patches (run `dllm runtime build`)")
    backend, key, _ = found[0]
    work = Path(os.environ["DLLM_RUNTIME_DIR"]).parent / "build" / f"{backend}-{key}" / "build"
    if not (work / "build.ninja").is_file() or not shutil.which("ninja"):
        pytest.skip(f"the build tree {work} is not kept here")
    cmds = subprocess.run(["ninja", "-C", str(work), "-t", "commands", "ggml-cpu"], capture_output=True, text=True,
                          check=True).stdout
    out = {}
    for line in cmds.splitlines():
        argv = shlex.split(line)
        if "-c" not in argv:
            continue
        src = argv[argv.index("-c") + 1]
        for name in SOURCES:
            if src.endswith("/ggml-cpu/" + name):
                out[name] = argv
    assert set(out) == set(SOURCES), f"no compile command for {set(SOURCES) - set(out)}"
    return out


def _retarget(argv: list[str], target: str, arm: bool = False) -> list[str]:
    """``argv`` for ``-march=target`` at ``-O0``, the object to /dev/null, no dependency file; ``arm``: the aarch64
    cross compiler, without the x86-only AMX flags."""
    assert "-march=native" in argv, "GGML_NATIVE builds for the host"
    out: list[str] = [ARM_COMPILERS[Path(argv[0]).name] if arm else argv[0]]
    args = iter(argv[1:])
    for a in args:
        if a in ("-o", "-MF", "-MT", "-MQ"):
            next(args)  # the option's file
            if a == "-o":
                out += ["-o", os.devnull]
        elif a in ("-MD", "-MMD") or (arm and a.startswith("-mno-amx")):
            continue
        else:
            out.append(f"-march={target}" if a == "-march=native" else "-O0" if a.startswith("-O") else a)
    return out


def _run_all(jobs: list[tuple[str, str, list[str]]]) -> None:
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        results = list(pool.map(lambda job: (job[0], job[1], subprocess.run(job[2], capture_output=True, text=True,
                                                                             timeout=600)), jobs))
    failed = [f"{name} -march={t}: {r.stderr.strip()[-1500:]}" for name, t, r in results if r.returncode != 0]
    assert not failed, "\n\n".join(failed)


def test_patched_sources_compile_for_every_x86_class():
    cmds = _commands()
    compiler = next(iter(cmds.values()))[0]
    known = [t for t in X86_TARGETS if subprocess.run([compiler, f"-march={t}", "-E", "-x", "c", os.devnull],
                                                      capture_output=True).returncode == 0]
    assert {"x86-64", "x86-64-v3", "skylake-avx512"} <= set(known), f"{compiler} knows only {known}"
    _run_all([(name, t, _retarget(argv, t)) for name, argv in cmds.items() for t in known])


def test_patched_sources_compile_for_arm64():
    cmds = _commands()
    missing = sorted({c for c in ARM_COMPILERS.values() if not shutil.which(c)})
    if missing:
        pytest.skip(f"no {', '.join(missing)} (Debian: apt install g++-aarch64-linux-gnu; CI installs it)")
    _run_all([(name, t, _retarget(argv, t, arm=True)) for name, argv in cmds.items() if not name.startswith("arch/x86/")
              for t in ARM_TARGETS])
