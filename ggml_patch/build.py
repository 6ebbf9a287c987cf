"""Fetch the pinned llama-cpp-python sdist, apply ``patches/*.patch`` to its vendored llama.cpp, build
the shared libraries with CMake and install them into ``<runtime root>/<backend>-<key>/lib/``.

Run as ``python -m ggml_patch.build fetch|sdist-path|build [--backend B] [--force]`` (the Makefile uses the
first two before dllm is installed); ``dllm runtime build`` drives ``build()``.

The key is a hash of the sdist checksum, the patch files, the backend and the CMake flags (for CUDA these hold the
architecture list and the toolkit, see ``cuda_toolkit``); it is also
compiled into the library (``DLLM_PATCHSET``) and read back by ``llama_dllm_version()``, so Python can
tell a library built from the current patches from a stale one.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ggml_patch import backends as BK
from ggml_patch import cpu_features
from ggml_patch import cuda_toolkit
from ggml_patch.backends.cuda import CudaSetup, cuda_setup as _cuda_setup
from ggml_patch.staging import staged_dir

PACKAGE = "llama-cpp-python"
VERSION = "0.3.36"
SDIST_NAME = f"llama_cpp_python-{VERSION}.tar.gz"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
LLAMA_CPP_COMMIT = "0c1e570"  # the llama.cpp commit vendored in that sdist
PATCH_DIR = Path(__file__).resolve().parent / "patches"


class FetchError(RuntimeError):
    """The sdist could not be downloaded or failed its checksum."""


def home() -> Path:
    return Path(os.environ.get("DLLM_HOME") or Path.home() / ".cache" / "dllm")


def sdist_path() -> Path:
    return home() / "sdist" / SDIST_NAME


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch(log=print) -> Path:
    """Download the pinned sdist through pip (once) and verify its sha256."""
    dest = sdist_path()
    if dest.is_file() and sha256(dest) == SDIST_SHA256:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    log(f"fetching {PACKAGE}=={VERSION} sdist through pip ...")
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               "-q", "-d", tmp, f"{PACKAGE}=={VERSION}"]
        res = subprocess.run(cmd, capture_output=True, text=True)
        got = Path(tmp) / SDIST_NAME
        if not got.is_file():
            raise FetchError(f"pip could not download {PACKAGE}=={VERSION}: {res.stderr.strip()[-300:]}")
        digest = sha256(got)
        if digest != SDIST_SHA256:
            raise FetchError(f"{SDIST_NAME} has sha256 {digest}, expected {SDIST_SHA256}")
        os.replace(got, dest)
    return dest



BACKENDS = BK.NAMES
KEY_LEN = 16
# CMake options common to every backend: only libllama and the ggml shared libraries, relocatable ($ORIGIN)
BASE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=ON",
    "-DLLAMA_BUILD_COMMON=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_TOOLS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_APP=OFF",
    "-DCMAKE_INSTALL_RPATH=$ORIGIN", "-DCMAKE_BUILD_WITH_INSTALL_RPATH=ON",
    "-DGGML_RPC=ON",  # libggml-rpc: remote devices (`--rpc`) and the worker behind `dllm rpc-server`
)
# Flags that differ between builds of one backend (compiler-probed -mno-amx-*, the wheel RPATH, and each
# backend's own: the CUDA architectures and toolkit). Loading compares a build's other flags with today's and
# recomputes its key from all of them.
VARIABLE_FLAGS = ("-DCMAKE_C_FLAGS=", "-DCMAKE_CXX_FLAGS=", "-DCMAKE_INSTALL_RPATH=",
                  *(f for b in BK.REGISTRY.values() for f in b.variable_flags))
LIB_PREFIXES = ("libllama", "libggml", "llama", "ggml")
LIB_SUFFIXES = (".so", ".dylib", ".dll")


def _build_error(message: str, hint: str | None = None) -> Exception:
    # dllm's typed error when the package is importable (it always is once installed)
    return BK.error("BuildError", message, hint)


def runtime_root() -> Path:
    """Where built runtimes are installed: ``$DLLM_RUNTIME_DIR`` or ``$DLLM_HOME/runtime``."""
    env = os.environ.get("DLLM_RUNTIME_DIR")
    return Path(env) if env else home() / "runtime"


def patch_files(patch_dir: Path | None = None, backend: str | None = None) -> list[Path]:
    """The patches in apply order (file name order: ``NNNN-name.patch``); with ``backend``, without the patches
    that belong to another backend only (``Backend.patches``: e.g. the Vulkan header guard)."""
    return for_backend(sorted((patch_dir or PATCH_DIR).glob("*.patch")), backend)


def for_backend(patches: list[Path], backend: str | None) -> list[Path]:
    """``patches`` less those reserved to a backend other than ``backend`` (None: all of them)."""
    if backend is None:
        return patches
    only = BK.backend_only_patches()
    return [p for p in patches if only.get(p.name, backend) == backend]


def resolve_backend(backend: str = "auto") -> str:
    """``auto`` -> the first of ``backends.AUTO_ORDER`` present here (cuda with an NVIDIA driver and an ``nvcc``,
    metal on macOS, vulkan with a Vulkan GPU and glslc, else cpu); a name -> itself (BuildError if unknown)."""
    if backend == "auto":
        return next(name for name in BK.AUTO_ORDER if BK.get(name).present())
    return BK.get(backend).name


def cuda_setup(cuda_arch: str | None = None, toolkit: str = "auto", status: Callable[[str], None] | None = None,
               dirs: list[Path] | None = None) -> CudaSetup:
    """``backends.cuda.cuda_setup`` with the wheel root under ``$DLLM_HOME/cuda-toolkit``."""
    return _cuda_setup(cuda_arch, toolkit, status, dirs, home())


def cmake_flags(backend: str, amx: bool = False, cuda: BK.Setup | None = None,
                setup: BK.Setup | None = None) -> list[str]:
    """CMake options for ``backend``. Unless ``amx``, x86 builds add ``-mno-amx-*`` to the C and C++ flags so
    ``-march=native`` cannot compile ggml's AMX kernels, which crash quantized matmuls (see ``cpu_features``).
    ``setup`` (or ``cuda``, its older name) adds the toolchain's options: for CUDA the architectures, compiler and
    toolkit root, and the wheel library directories in the RPATH."""
    flags = [*BASE_FLAGS, *BK.get(backend).flags]
    tool = setup or cuda
    if tool is not None:
        flags = tool.cmake_flags(flags)
    off = [] if amx else cpu_features.amx_off_flags()
    if off:
        flags += [f"-DCMAKE_C_FLAGS={' '.join(off)}", f"-DCMAKE_CXX_FLAGS={' '.join(off)}"]
    return flags


def fixed_flags(flags: list[str]) -> list[str]:
    """``flags`` without the ones that vary between builds of a backend (``VARIABLE_FLAGS``)."""
    return [f for f in flags if not f.startswith(VARIABLE_FLAGS)]


def cache_key(backend: str, flags: list[str] | None = None, patches: list[Path] | None = None,
              cpu: str | None = None, toolchain: dict[str, str] | None = None) -> str:
    """sha256 over (sdist sha, the backend's patches' names + contents in apply order, backend, flags, CPU
    fingerprint, toolchain versions), truncated.

    The CPU fingerprint (``cpu_features.fingerprint()``) is in the key because ``GGML_NATIVE`` builds for the
    building machine: a ``DLLM_HOME`` shared between machines keeps one build per CPU class. ``toolchain``
    (``Setup.key_parts()``: glslc and the Vulkan headers) adds versions no flag names; none for cpu.
    """
    h = hashlib.sha256()
    h.update(f"sdist:{SDIST_SHA256}\n".encode())
    for p in for_backend(patch_files() if patches is None else patches, backend):
        h.update(f"patch:{p.name}:{len(p.read_bytes())}\n".encode())
        h.update(p.read_bytes())
    h.update(f"backend:{backend}\n".encode())
    for f in (cmake_flags(backend) if flags is None else flags):
        h.update(f"flag:{f}\n".encode())
    h.update(f"cpu:{cpu or cpu_features.fingerprint()}\n".encode())
    for k, v in sorted((toolchain or {}).items()):
        h.update(f"toolchain:{k}={v}\n".encode())
    return h.hexdigest()[:KEY_LEN]


def install_dir(backend: str, key: str) -> Path:
    return runtime_root() / f"{backend}-{key}"


def read_build_info(path: Path) -> dict | None:
    """``build.json`` of an installed runtime directory, or None if it is missing or unreadable."""
    try:
        return json.loads((path / "build.json").read_text())
    except (OSError, ValueError):
        return None


@dataclass(frozen=True)
class BuildResult:
    path: Path       # the installed runtime directory (libraries under ``lib/``)
    backend: str
    key: str
    built: bool      # False when an up-to-date build was already installed
    seconds: float


Status = Callable[[str], None]


def _run(cmd: list[str], cwd: Path, log_path: Path, status: Status, step: str) -> None:
    """Run ``cmd``, appending its output to ``log_path``; show ninja/make step lines in ``status``."""
    status(step)
    tail: deque[str] = deque(maxlen=12)
    with open(log_path, "a") as log:
        log.write(f"\n$ {' '.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                errors="replace")
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            tail.append(line.rstrip())
            if line.startswith("[") and "]" in line[:16]:
                status(f"{step} {line.strip()[:100]}")
        rc = proc.wait()
    if rc != 0:
        last = " | ".join(t for t in tail if t)[-400:]
        raise _build_error(f"{step} failed (exit {rc}): {last}", f"full log: {log_path}")


def _extract(sdist: Path, dest: Path) -> None:
    """Extract the sdist's ``vendor/llama.cpp`` into ``dest``."""
    prefix = f"llama_cpp_python-{VERSION}/vendor/llama.cpp/"
    with staged_dir(dest, suffix=".part") as tmp:  # world-readable, as the source tree was before
        _extract_into(sdist, tmp, prefix)


def _extract_into(sdist: Path, tmp: Path, prefix: str) -> None:
    with tarfile.open(sdist) as tar:
        members = []
        for m in tar.getmembers():
            if m.name.startswith(prefix) and len(m.name) > len(prefix):
                m.name = m.name[len(prefix):]
                if m.name == ".git" or m.name.startswith(".git/"):  # a submodule gitfile pointing nowhere
                    continue
                members.append(m)
        if not members:
            raise _build_error(f"{sdist.name} has no {prefix}", "delete it and rerun: dllm runtime build")
        tar.extractall(tmp, members=members, filter="data")


def apply_patches(src: Path, patches: list[Path], log_path: Path | None = None) -> None:
    """``git apply --check`` then ``git apply`` each patch in order; the first that does not apply is named."""
    git = shutil.which("git")
    if not git:
        raise _build_error("git is needed to apply the llama.cpp patches", "install git and rerun")
    # keep git from discovering an enclosing repository (it would resolve paths against that one)
    env = {**os.environ, "GIT_CEILING_DIRECTORIES": str(src.parent)}
    for p in patches:
        for args in (["--check"], []):
            res = subprocess.run([git, "apply", *args, "--whitespace=nowarn", str(p)], cwd=src, env=env,
                                 capture_output=True, text=True)
            if log_path is not None:
                with open(log_path, "a") as log:
                    log.write(f"$ git apply {' '.join(args)} {p.name}\n{res.stdout}{res.stderr}")
            if res.returncode != 0:
                why = (res.stderr.strip().splitlines() or ["git apply failed"])[0]
                raise _build_error(f"patch {p.name} does not apply to llama.cpp {LLAMA_CPP_COMMIT}: {why}",
                                   "regenerate the patch against the pinned tree (see ggml_patch/README.md)")


def _libraries(bin_dir: Path) -> list[Path]:
    return sorted(p for p in bin_dir.iterdir()
                  if p.name.startswith(LIB_PREFIXES) and any(s in p.name for s in LIB_SUFFIXES))


def _install(bin_dir: Path, target: Path, info: dict) -> None:
    """Copy the libraries (symlinks kept) and build.json into a temp dir next to ``target``, then rename."""
    with staged_dir(target) as tmp:  # world-readable: the runtime may be shared
        lib = tmp / "lib"
        lib.mkdir()
        libs = _libraries(bin_dir)
        if not any(p.name.startswith(("libllama", "llama")) for p in libs):
            raise _build_error(f"the build produced no libllama in {bin_dir}")
        for p in libs:
            shutil.copy2(p, lib / p.name, follow_symlinks=False)
        info = {**info, "libraries": [p.name for p in libs]}
        (tmp / "build.json").write_text(json.dumps(info, indent=1) + "\n")


def installed(backend: str, key: str) -> bool:
    info = read_build_info(install_dir(backend, key))
    if not info:
        return False
    return info.get("key") == key and (install_dir(backend, key) / "lib").is_dir()


def prepare(name: str, key: str, flags: list[str], patches: list[Path], force: bool,
            status: Status) -> tuple[Path, Path, Path]:
    """Fetch the sdist, extract and patch it under ``$DLLM_HOME/build/<name>`` (unless already done for ``key``)
    and configure it with CMake. Returns (work dir, CMake build dir, log file)."""
    for tool in ("cmake",):
        if not shutil.which(tool):
            raise _build_error(f"{tool} is not on PATH", "install CMake >= 3.14 and a C++17 compiler")

    work = home() / "build" / name
    work.mkdir(parents=True, exist_ok=True)
    log_path = work / "build.log"
    log_path.write_text(f"dllm runtime build {name} {time.ctime()}\n")
    status("fetching the llama-cpp-python sdist")
    try:
        sdist = fetch(log=status)
    except FetchError as e:
        raise _build_error(str(e), "check the network access to PyPI, then rerun: dllm runtime build") from e

    src, bdir = work / "llama.cpp", work / "build"
    marker = src / ".dllm-patched"
    if force or not marker.is_file() or marker.read_text().strip() != key:
        status(f"extracting llama.cpp {LLAMA_CPP_COMMIT} from {sdist.name}")
        _extract(sdist, src)
        status(f"applying {len(patches)} patches")
        apply_patches(src, patches, log_path)
        marker.write_text(key + "\n")
        shutil.rmtree(bdir, ignore_errors=True)

    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    _run(["cmake", "-S", str(src), "-B", str(bdir), *gen, *flags, f"-DDLLM_PATCHSET={key}"], work, log_path,
         status, "configuring (cmake)")
    return work, bdir, log_path


def build(backend: str = "auto", force: bool = False, status: Status | None = None,
          jobs: int | None = None, amx: bool = False, cuda_arch: str | None = None,
          cuda_toolkit_source: str = "auto") -> BuildResult:
    """Build and install the patched runtime for ``backend`` unless the same key is already installed.

    ``amx`` compiles ggml's AMX kernels (off by default: they crash quantized models upstream). ``cuda_arch`` is
    ``--cuda-arch`` (None: the visible GPUs, else ``cuda_toolkit.DEFAULT_ARCHS``); ``cuda_toolkit_source`` is
    auto | system | pip.
    """
    t0 = time.monotonic()
    status = status or (lambda msg: None)
    if cuda_arch is not None:
        cuda_toolkit.parse_archs(cuda_arch)  # a bad value is a usage error whatever the backend
    backend = resolve_backend(backend)
    if cuda_arch is not None and backend != "cuda":
        raise cuda_toolkit._error("UsageError", f"--cuda-arch applies to the cuda backend, not {backend}",
                                  "add --backend cuda")
    setup = BK.get(backend).setup(status, {"cuda_arch": cuda_arch, "cuda_toolkit_source": cuda_toolkit_source})
    flags = cmake_flags(backend, amx=amx, setup=setup)
    patches = patch_files(backend=backend)
    toolchain = setup.key_parts()
    key = cache_key(backend, flags, patches, toolchain=toolchain)
    target = install_dir(backend, key)
    if not force and installed(backend, key):
        return BuildResult(target, backend, key, False, time.monotonic() - t0)
    work, bdir, log_path = prepare(f"{backend}-{key}", key, flags, patches, force, status)
    n = jobs or os.cpu_count() or 2
    _run(["cmake", "--build", str(bdir), "--target", "llama", "-j", str(n)], work, log_path, status,
         f"compiling libllama ({backend}, {n} jobs)")

    status(f"installing into {target}")
    bin_dir = bdir / "bin"
    info = {
        "backend": backend, "key": key, "flags": flags, "patches": [p.name for p in patches],
        "llama_cpp_commit": LLAMA_CPP_COMMIT, "llama_cpp_python": VERSION, "sdist_sha256": SDIST_SHA256,
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "platform": f"{sys.platform}-{platform.machine()}",
        "build_seconds": round(time.monotonic() - t0, 1), "amx": amx,
        "cpu_fingerprint": cpu_features.fingerprint(), "cpu_features": sorted(cpu_features.host_features()),
    }
    if toolchain:
        info["toolchain"] = toolchain  # in the key: loading recomputes the key with it
    if setup.describe():
        info[backend] = setup.describe()
    _install(bin_dir if bin_dir.is_dir() else bdir, target, info)
    return BuildResult(target, backend, key, True, time.monotonic() - t0)


USAGE = ("usage: python -m ggml_patch.build fetch|sdist-path|build [--backend B] [--force] [--amx] "
         "[--cuda-arch LIST] [--cuda-toolkit auto|system|pip]")


def _opt(argv: list[str], name: str) -> str | None:
    if name not in argv:
        return None
    i = argv.index(name)
    if i + 1 >= len(argv):
        raise cuda_toolkit._error("UsageError", f"{name} needs a value")
    return argv[i + 1]


def main(argv: list[str]) -> int:
    cmd = argv[0] if argv else "fetch"
    try:
        if cmd == "fetch":
            print(fetch(log=lambda m: print(m, file=sys.stderr)))
        elif cmd == "sdist-path":
            print(sdist_path())
        elif cmd == "build":
            res = build(_opt(argv, "--backend") or "auto", force="--force" in argv,
                        status=lambda m: print(m, file=sys.stderr), amx="--amx" in argv,
                        cuda_arch=_opt(argv, "--cuda-arch"), cuda_toolkit_source=_opt(argv, "--cuda-toolkit") or "auto")
            print(res.path)
        else:
            print(USAGE, file=sys.stderr)
            return 2
    except FetchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # BuildError, UsageError (or RuntimeError before dllm is installed)
        if type(e).__name__ not in ("BuildError", "UsageError", "RuntimeError"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2 if type(e).__name__ == "UsageError" else 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
