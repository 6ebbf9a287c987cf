"""Compile check of the patched runtime for CUDA, on a machine without a GPU (``make cuda-check``).

    python -m ggml_patch.cuda_check [--arch 80-real;90-real] [--only REGEX]... [--jobs N]
                                    [--toolkit auto|system|pip] [--list]

Configures the patched llama.cpp exactly as ``dllm runtime build --backend cuda --cuda-arch ARCH`` would (same
``build.cmake_flags``, same toolkit discovery: a system toolkit or the ``[cuda]`` extra's pip wheels) in
``$DLLM_HOME/build/cuda-check-<key>/`` and compiles either everything (libggml-cuda and libllama) or, with
``--only``, the ggml-cuda objects whose source path matches REGEX (``--only 'mmq|fattn-mma'``, ``--only
'/(argsort|softmax|getrows)\\.cu'``). Several ``--only`` are compiled group after group in the order given (ninja
itself starts ready objects in manifest order), so the objects that matter most can go first on a slow machine
(``make cuda-check-llada2``). Nothing is installed: the library could not be loaded without a GPU anyway.

It prints, and writes to ``cuda-check.json`` in the build directory: the toolkit (origin, version), the
architectures, how many of the ggml-cuda objects are built, per-object compile times from ``.ninja_log``, the wall
time and the sizes of the libraries built. A rerun compiles only what is missing (ninja), so an interrupted check
resumes. Exit 0 when everything asked for compiled, 1 on a compile error, 2 on bad arguments.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from ggml_patch import build as B
from ggml_patch import cuda_toolkit

DEFAULT_CHECK_ARCHS = "80-real;90-real"  # one Ampere, one Hopper: machine code only, no PTX (half the work of "80;90")


PROBE_CMAKE = """cmake_minimum_required(VERSION 3.18)
project(dllm_link_probe CXX)
find_package(CUDAToolkit REQUIRED)
enable_language(CUDA)
add_library(probe SHARED probe.cu)
target_link_libraries(probe PRIVATE CUDA::cudart CUDA::cublas CUDA::cuda_driver)  # what ggml-cuda links
"""
PROBE_CU = """#include <cuda.h>
#include <cublas_v2.h>
__global__ void twice(float * x) { x[threadIdx.x] *= 2.0f; }
extern "C" int probe(void) {
    CUdevice d; if (cuDeviceGet(&d, 0) != CUDA_SUCCESS) return 1;  // driver API, as ggml-cuda's VMM pool
    cublasHandle_t h; if (cublasCreate(&h) != CUBLAS_STATUS_SUCCESS) return 2;
    float * x; if (cudaMalloc(&x, 64) != cudaSuccess) return 3;
    twice<<<1, 16>>>(x);
    return 0;
}
"""
PROBE_FLAGS = ("-DCMAKE_CUDA_ARCHITECTURES=", "-DCMAKE_CUDA_COMPILER=", "-DCUDAToolkit_ROOT=", "-DCMAKE_INSTALL_RPATH=",
               "-DCMAKE_BUILD_WITH_INSTALL_RPATH=", "-DCMAKE_BUILD_TYPE=")


def dynamic_section(lib: Path) -> tuple[list[str], list[str]]:
    """(NEEDED sonames, RUNPATH/RPATH entries) of ``lib`` from ``readelf -d``; ([], []) without readelf."""
    if not shutil.which("readelf"):
        return [], []
    out = subprocess.run(["readelf", "-d", str(lib)], capture_output=True, text=True).stdout
    needed = re.findall(r"\(NEEDED\)\s+Shared library: \[(.+?)\]", out)
    paths = [p for m in re.findall(r"\((?:RUNPATH|RPATH)\)\s+Library r(?:un)?path: \[(.*?)\]", out)
             for p in m.split(":") if p]
    return needed, paths


def link_probe(flags: list[str], work: Path, log_path: Path, status) -> dict:
    """Compile and link a one-kernel shared library against cudart, cuBLAS and the driver with the build's CUDA flags
    (compiler, toolkit root, architectures, RPATH), then say where each CUDA library it needs is found: libcudart
    and libcublas through the RUNPATH, libcuda.so.1 only from a driver (not found on a machine without one)."""
    d = work / "link-probe"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    (d / "CMakeLists.txt").write_text(PROBE_CMAKE)
    (d / "probe.cu").write_text(PROBE_CU)
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    B._run(["cmake", "-S", str(d), "-B", str(d / "build"), *gen, *(f for f in flags if f.startswith(PROBE_FLAGS))],
           d, log_path, status, "link probe: configuring")
    B._run(["cmake", "--build", str(d / "build")], d, log_path, status, "link probe: compiling")
    lib = d / "build" / "libprobe.so"
    needed, runpath = dynamic_section(lib)
    dirs = [Path(p.replace("$ORIGIN", str(lib.parent))) for p in runpath]
    found = {n: next((str(x / n) for x in dirs if (x / n).exists()), None) for n in needed
             if n.startswith(("libcudart", "libcublas", "libcuda."))}
    return {"library": str(lib), "needed": needed, "runpath": runpath, "found_in_runpath": found}


def cu_objects(bdir: Path) -> list[str]:
    """The ggml-cuda object files of the configured build (``...ggml-cuda.dir/<source>.cu.o``), from ninja."""
    res = subprocess.run(["ninja", "-C", str(bdir), "-t", "targets", "all"], capture_output=True, text=True)
    objs = [line.split(":")[0] for line in res.stdout.splitlines()]
    return sorted(o for o in objs if o.endswith(".cu.o") and "ggml-cuda" in o)


def ninja_times(bdir: Path) -> dict[str, float]:
    """Seconds each output took in its latest build, from ``.ninja_log`` (``start end mtime output hash``, ms)."""
    times: dict[str, float] = {}
    log = bdir / ".ninja_log"
    for line in log.read_text().splitlines()[1:] if log.is_file() else []:
        parts = line.split("\t")
        if len(parts) >= 4 and parts[0].isdigit() and parts[1].isdigit():
            times[parts[3]] = (int(parts[1]) - int(parts[0])) / 1000
    return times


def ordered_groups(objs: list[str], patterns: list[re.Pattern[str]]) -> list[list[str]]:
    """The objects matching each pattern, minus those of earlier patterns; empty groups dropped."""
    seen: set[str] = set()
    groups = []
    for pat in patterns:
        group = [o for o in objs if pat.search(o) and o not in seen]
        seen.update(group)
        if group:
            groups.append(group)
    return groups


def library_sizes(bdir: Path) -> dict[str, int]:
    """Bytes of each shared library built (real files; the versioned-soname symlinks are skipped)."""
    out = {}
    for d in (bdir / "bin", bdir):
        for p in sorted(d.glob("lib*.so*")) if d.is_dir() else []:
            if p.is_file() and not p.is_symlink():
                out[p.name] = p.stat().st_size
    return out


def _args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m ggml_patch.cuda_check", description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default=DEFAULT_CHECK_ARCHS, help=f"CUDA architectures (default {DEFAULT_CHECK_ARCHS})")
    ap.add_argument("--only", metavar="REGEX", action="append", default=[],
                    help="compile only the ggml-cuda objects whose path matches REGEX; repeat for ordered groups")
    ap.add_argument("--jobs", "-j", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--toolkit", choices=cuda_toolkit.TOOLKIT_CHOICES, default="auto")
    ap.add_argument("--list", action="store_true", help="configure, list the ggml-cuda objects and exit")
    return ap.parse_args(argv)


def main(argv: list[str]) -> int:
    a = _args(argv)
    if a.jobs < 1:
        print("error: --jobs must be at least 1", file=sys.stderr)
        return 2
    if not shutil.which("ninja"):
        print("error: the CUDA check needs ninja (apt install ninja-build)", file=sys.stderr)
        return 1
    patterns = []
    for text in a.only:
        try:
            patterns.append(re.compile(text))
        except re.error as e:
            print(f"error: --only {text!r} is not a regular expression: {e}", file=sys.stderr)
            return 2
    status = lambda m: print(m, file=sys.stderr)  # noqa: E731
    t0 = time.monotonic()
    try:
        setup = B.cuda_setup(a.arch, a.toolkit, status)
        flags = B.cmake_flags("cuda", cuda=setup)
        patches = B.patch_files()
        key = B.cache_key("cuda", flags, patches)
        work, bdir, log_path = B.prepare(f"cuda-check-{key}", key, flags, patches, False, status)
        probe = link_probe(flags, work, log_path, status)
    except Exception as e:
        if type(e).__name__ not in ("BuildError", "UsageError", "RuntimeError"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2 if type(e).__name__ == "UsageError" else 1
    runtime_libs = [n for n in probe["found_in_runpath"] if not n.startswith("libcuda.")]
    unresolved = [n for n in runtime_libs if probe["found_in_runpath"][n] is None]
    print(f"link probe: needs {', '.join(probe['found_in_runpath']) or '(readelf missing)'}; "
          + ", ".join(f"{n} -> {v or 'NOT in the RUNPATH'}" for n, v in probe["found_in_runpath"].items()
                      if not n.startswith("libcuda.")) + "; libcuda.so.1 comes from the driver")
    if setup.toolkit.origin == "pip" and unresolved:
        print(f"error: the RUNPATH {probe['runpath']} does not lead to {', '.join(unresolved)}", file=sys.stderr)
        return 1
    objs = cu_objects(bdir)
    groups = ordered_groups(objs, patterns) if patterns else [["llama"]]
    chosen = [o for g in groups for o in g] if patterns else objs
    if a.list:
        print("\n".join(chosen))
        return 0
    if patterns and not chosen:
        print(f"error: --only {' '.join(a.only)!r} matches none of the {len(objs)} ggml-cuda objects (see --list)",
              file=sys.stderr)
        return 2
    status(f"compiling {len(chosen)} of {len(objs)} ggml-cuda objects for {setup.archs} with "
           f"{setup.toolkit.origin} CUDA {setup.toolkit.version}, {a.jobs} jobs; log: {log_path}")
    t1 = time.monotonic()
    rc = 0
    try:
        for i, group in enumerate(groups, 1):
            B._run(["ninja", "-C", str(bdir), "-j", str(a.jobs), *group], work, log_path, status,
                   f"compiling (group {i}/{len(groups)})")
    except Exception as e:
        if type(e).__name__ not in ("BuildError", "RuntimeError"):
            raise
        print(f"error: {e}", file=sys.stderr)
        rc = 1
    wall = time.monotonic() - t1
    times = ninja_times(bdir)
    done = {o: times[o] for o in objs if o in times and (bdir / o).is_file()}
    report = {
        "toolkit": setup.toolkit.describe(), "archs": setup.archs, "key": key, "build_dir": str(bdir),
        "objects_total": len(objs), "objects_built": len(done), "objects_asked": len(chosen),
        "object_seconds": dict(sorted(done.items(), key=lambda kv: -kv[1])),
        "object_seconds_sum": round(sum(done.values()), 1), "wall_seconds": round(wall, 1),
        "setup_seconds": round(t1 - t0, 1), "libraries": library_sizes(bdir), "jobs": a.jobs,
        "load_after": os.getloadavg(), "ok": rc == 0, "link_probe": probe,
    }
    (work / "cuda-check.json").write_text(json.dumps(report, indent=1) + "\n")
    slow = ", ".join(f"{Path(o).name.removesuffix('.cu.o')} {s:.0f}s" for o, s in list(report["object_seconds"].items())[:5])
    print(f"CUDA {setup.toolkit.version} ({setup.toolkit.origin}), archs {setup.archs}: "
          f"{len(done)}/{len(objs)} ggml-cuda objects built, {wall:.0f} s wall this run, "
          f"{report['object_seconds_sum']:.0f} s of object compiles in all")
    if slow:
        print(f"slowest: {slow}")
    for name, size in report["libraries"].items():
        print(f"{name:28} {size / 2**20:8.1f} MiB")
    print(f"report: {work / 'cuda-check.json'}")
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
