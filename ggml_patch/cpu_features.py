"""The host CPU's instruction-set features, and the compiler flags that keep known-bad kernels out of a build.

``GGML_NATIVE`` compiles ggml for the building machine (``-march=native``), so a library is only safe on a CPU that
has every feature the builder had. The runtime cache key therefore includes a fingerprint of the builder's
features, and ``build.json`` records them so that a library copied to (or shared with) another machine is refused
with one line instead of dying with SIGILL.

AMX: ggml's AMX kernels (``ggml-cpu/amx``) crash quantized matmuls on Sapphire Rapids class CPUs
(ggml-org/llama.cpp#20824, ollama/ollama#17205, still open upstream). ``-march=native`` turns them on there, so the
default build adds ``-mno-amx-*`` (GCC and Clang honour an explicit ``-mno-`` over ``-march=native``);
``dllm runtime build --amx`` opts back in.
"""
from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

# x86 /proc/cpuinfo flags a compiler can emit instructions for under -march=native (ISA extensions only: no
# microcode, virtualisation or power-management bits, which differ between otherwise identical machines)
X86_ISA = frozenset("""
    sse sse2 pni ssse3 sse4_1 sse4_2 sse4a popcnt abm lzcnt movbe cx16 aes pclmulqdq sha_ni f16c fma fma4 xop
    avx avx2 bmi1 bmi2 adx rdrand rdseed clflushopt clwb xsave xsaveopt xsavec xsaves fsgsbase rdpid
    avx512f avx512dq avx512cd avx512bw avx512vl avx512ifma avx512vbmi avx512_vbmi2 avx512_vnni avx512_bitalg
    avx512_vpopcntdq avx512_bf16 avx512_fp16 avx512_vp2intersect avx_vnni avx_vnni_int8 avx_ifma avx_ne_convert
    gfni vaes vpclmulqdq amx_tile amx_int8 amx_bf16 amx_fp16 amx_complex serialize tsxldtrk waitpkg movdiri
    movdir64b enqcmd
""".split())
# GCC/Clang options that disable AMX; each is passed only if the compiler knows it (GCC 12 lacks amx-fp16)
AMX_OFF_FLAGS = ("-mno-amx-tile", "-mno-amx-int8", "-mno-amx-bf16", "-mno-amx-fp16", "-mno-amx-complex")


def is_x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return ""


def parse_cpuinfo(text: str) -> frozenset[str]:
    """ISA features from a Linux ``/proc/cpuinfo``: the x86 ``flags`` line (filtered to ``X86_ISA``) or the Arm
    ``Features`` line (all of it: every Arm feature bit is an ISA extension)."""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key == "flags":
            return frozenset(value.split()) & X86_ISA
        if key == "features":
            return frozenset(value.split())
    return frozenset()


def _sysctl_features() -> frozenset[str]:
    """macOS: the ``hw.optional.*`` capabilities that are set (``hw.optional.arm.FEAT_DotProd: 1``)."""
    try:
        out = subprocess.run(["sysctl", "hw.optional"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return frozenset()
    feats = set()
    for line in out.splitlines():
        name, _, value = line.partition(":")
        if value.strip() == "1":
            feats.add(name.strip().removeprefix("hw.optional.").lower())
    return frozenset(feats)


@lru_cache(maxsize=1)
def host_features() -> frozenset[str]:
    """This CPU's ISA features (lower-case names as the OS reports them); empty where they cannot be read."""
    if sys.platform == "darwin":
        return _sysctl_features()
    return parse_cpuinfo(_cpuinfo())


def fingerprint(features: frozenset[str] | None = None, machine: str | None = None) -> str:
    """A short stable id of (architecture, ISA features): part of the runtime cache key."""
    feats = host_features() if features is None else features
    h = hashlib.sha256(f"{machine or platform.machine()}:{' '.join(sorted(feats))}".encode())
    return h.hexdigest()[:12]


def missing(recorded: list[str] | None, host: frozenset[str] | None = None) -> list[str]:
    """Features a build recorded that this CPU lacks (empty: the library can run here)."""
    have = host_features() if host is None else host
    return sorted(set(recorded or ()) - have)


@lru_cache(maxsize=8)
def compiler_accepts(compiler: str, flag: str) -> bool:
    """Whether ``compiler`` accepts ``flag`` (an unknown ``-mno-*`` is a hard error, so each one is probed)."""
    exe = shutil.which(compiler)
    if not exe:
        return False
    try:
        res = subprocess.run([exe, flag, "-E", "-x", "c", os.devnull], capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return False
    return res.returncode == 0


def amx_off_flags() -> list[str]:
    """The ``-mno-amx-*`` options both the C and the C++ compiler CMake will use accept (none off x86)."""
    if not is_x86():
        return []
    cc, cxx = os.environ.get("CC", "cc"), os.environ.get("CXX", "c++")
    return [f for f in AMX_OFF_FLAGS if compiler_accepts(cc, f) and compiler_accepts(cxx, f)]
