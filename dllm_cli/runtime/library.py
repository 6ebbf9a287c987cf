"""Find the patched libllama built by ``dllm runtime build``, load it through llama-cpp-python, check its marker.

llama-cpp-python reads ``LLAMA_CPP_LIB_PATH`` (a directory) once, at ``import llama_cpp``, and binds every
symbol eagerly, so the path must be set before the first import, and the library must be built from the same
vendored tree. ``llama_dllm_version()`` must contain the cache key of the current patches: a build of older
patches (or a stock libllama) is refused with a message naming the command that fixes it.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Iterator

from ggml_patch import backends as BK
from ggml_patch import build as B
from ggml_patch import cpu_features
from dllm_cli.errors import RuntimeMissingError
from dllm_cli.runtime import aborts, bindings, threads

_FIX = "run `dllm runtime build`"
_lock = threading.Lock()
_loaded: Runtime | None = None


@dataclass(frozen=True)
class Runtime:
    """The loaded patched runtime. ``lib`` is the ``llama_cpp`` module (its low-level ctypes API)."""

    lib: ModuleType
    cdll: ctypes.CDLL
    path: Path               # the installed runtime directory (``lib/`` holds the libraries)
    backend: str             # cpu | cuda | metal | vulkan
    key: str                 # patch-set key, also inside llama_dllm_version()
    build: dict = field(default_factory=dict, repr=False)   # build.json
    wait: threads.WaitPolicy | None = None  # how ggml's threads wait at barriers (libgomp), fixed at load

    def info(self) -> dict[str, Any]:
        """Library path, backend, marker, llama.cpp commit, build flags and the ggml devices."""
        return {
            "library": str(self.path / "lib"), "backend": self.backend, "patchset": self.key,
            "version": bindings.version(self), "llama_cpp_commit": self.build.get("llama_cpp_commit"),
            "llama_cpp_python": self.build.get("llama_cpp_python"), "flags": self.build.get("flags", []),
            "patches": self.build.get("patches", []), "built_at": self.build.get("built_at"),
            "devices": bindings.devices(self), "amx": bool(self.build.get("amx")),
            "cpu_compiled": bindings.compiled_cpu_features(self),
            "cpu_host": sorted(cpu_features.host_features()),
            "cuda": cuda_info(self.build), "threads": threads.describe(self.wait),
            "vulkan": BK.VULKAN.info(self.build),
        }


def cuda_info(build: dict) -> dict[str, Any] | None:
    """The architectures and toolkit a CUDA build recorded (None for other backends; builds made before they were
    recorded show ``unknown``)."""
    return BK.CUDA.info(build)


def candidates(backend: str = "auto") -> list[tuple[str, str, Path]]:
    """Installed builds of the *current* patches for *this CPU* as (backend, key, dir), best first.

    An explicit backend only matches itself; ``auto`` prefers the backend auto-detection picks, then any other
    current build. Within a backend the newest build wins (the default one, or the ``--amx`` opt-in).
    """
    if backend != "auto":
        wanted = B.resolve_backend(backend)
        builds = {wanted: _current_builds(wanted)}
    else:
        builds = {b: _current_builds(b) for b in B.BACKENDS}
        have = [b for b in B.BACKENDS if builds[b]]
        # probing for devices (a Vulkan enumeration is a subprocess) only matters when there is a choice
        wanted = have[0] if len(have) == 1 else B.resolve_backend("auto")
    found = [(b, key, d, (d / "build.json").stat().st_mtime) for b, found_b in builds.items() for key, d in found_b]
    found.sort(key=lambda f: (f[0] != wanted, -f[3]))
    return [(b, k, d) for b, k, d, _ in found]


def _current_builds(backend: str) -> list[tuple[str, Path]]:
    """(key, dir) of the installed ``backend`` builds whose key, recomputed from the flags they were built with,
    matches the current patches and this CPU. The flags come from build.json rather than from probing the compiler
    again: loading must not depend on which compiler is on PATH now (or on $CC), nor spawn it at every start."""
    root = B.runtime_root()
    out = []
    for d in sorted(root.glob(f"{backend}-*")) if root.is_dir() else []:
        info = B.read_build_info(d)
        key = d.name[len(backend) + 1:]
        if not info or info.get("key") != key or not (d / "lib").is_dir():
            continue
        flags = [str(f) for f in info["flags"]] if isinstance(info.get("flags"), list) else []
        # the flags must be today's, apart from those that vary between builds (the compiler-probed -mno-amx-*,
        # the CUDA architectures and toolkit): those are in the key, recomputed here
        raw = info.get("toolchain")
        toolchain = {str(k): str(v) for k, v in raw.items()} if isinstance(raw, dict) else None
        if B.fixed_flags(flags) == B.fixed_flags(B.cmake_flags(backend, amx=True)) \
                and key == B.cache_key(backend, flags, toolchain=toolchain):
            out.append((key, d))
    return out


def _stale_hint(backend: str) -> str:
    root = B.runtime_root()
    others = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")) if root.is_dir() else []
    other_cpu = [p.name for p in others if _foreign_cpu(B.read_build_info(p))]
    if other_cpu:
        what = f"{', '.join(other_cpu)} were built on a CPU with other features"
    elif others:
        what = f"only builds of other patch sets are installed ({', '.join(p.name for p in others)})"
    else:
        what = "none is installed"
    return f"no runtime built from the current patches for this CPU and backend {backend!r} under {root}: {what}"


def _foreign_cpu(info: dict | None) -> bool:
    return info is not None and info.get("cpu_fingerprint") not in (None, cpu_features.fingerprint())


def check_cpu(info: dict, libdir: Path) -> None:
    """Refuse a library whose build recorded CPU features this CPU lacks (it would die with SIGILL)."""
    lacking = cpu_features.missing(info.get("cpu_features"))
    if lacking:
        shown = ", ".join(lacking[:6]) + (f" and {len(lacking) - 6} more" if len(lacking) > 6 else "")
        raise RuntimeMissingError(f"the runtime in {libdir} was built for a CPU with {shown}, which this CPU lacks",
                                  "run `dllm runtime build` on this machine")


def load(backend: str | None = None) -> Runtime:
    """Load (once per process) the newest current build; raise RuntimeMissingError if none can be used."""
    global _loaded
    with _lock:
        if _loaded is not None:
            return _loaded
        requested = backend or os.environ.get("DLLM_BACKEND") or "auto"
        try:
            found = candidates(requested)
        except Exception as e:  # unknown backend name
            raise RuntimeMissingError(str(e), _FIX) from None
        if not found:
            raise RuntimeMissingError(_stale_hint(requested), _FIX)
        b, key, path = found[0]
        _loaded = _import(b, key, path, explicit=requested != "auto")
        return _loaded


def _import(backend: str, key: str, path: Path, explicit: bool = False) -> Runtime:
    libdir = path / "lib"
    if "llama_cpp" in sys.modules:
        mod = sys.modules["llama_cpp"]
        have = Path(getattr(getattr(mod.llama_cpp, "_lib", None), "_name", "") or "").parent
        if have.resolve() != libdir.resolve():
            raise RuntimeMissingError(f"llama_cpp was already imported with another library ({have})",
                                      "import dllm_cli.runtime.library.load() before llama_cpp")
    info = B.read_build_info(path) or {}
    check_cpu(info, libdir)
    preload_cuda_wheels(info)
    for warning in BK.get(backend).prepare_load(info, explicit):
        from dllm_cli.cli import output
        output.warn(warning)
    os.environ["LLAMA_CPP_LIB_PATH"] = str(libdir)
    wait = threads.configure_wait()  # libgomp reads it when libggml-cpu brings it in, just below
    try:
        import llama_cpp  # noqa: F401  (binds every symbol of our libllama now)
    except (OSError, RuntimeError, FileNotFoundError, AttributeError) as e:
        raise RuntimeMissingError(f"cannot load the patched libllama from {libdir}: {e}", _FIX) from None
    cdll = llama_cpp.llama_cpp._lib
    marker = _marker(cdll)
    if marker is None or key not in marker:
        raise RuntimeMissingError(
            f"{libdir} is not a build of the current patches (marker {marker!r}, expected {key})", _FIX)
    _quiet_logs(llama_cpp)
    aborts.install(libdir)
    llama_cpp.llama_backend_init()
    return Runtime(lib=llama_cpp, cdll=cdll, path=path, backend=backend, key=key, build=info, wait=wait)


_CUDA_LIBS = ("libcudart.so", "libcublasLt.so", "libcublas.so")  # dependency order
_preloaded: list[ctypes.CDLL] = []


def preload_cuda_wheels(info: dict) -> list[Path]:
    """For a CUDA build made with the pip wheels, load libcudart / libcublasLt / libcublas (RTLD_GLOBAL) before
    libggml-cuda, so it finds them even when the wheels moved since the build (a venv rebuilt elsewhere) and the
    RPATH recorded then points nowhere. Recorded directories first, then the wheels of this environment."""
    tk = (BK.CUDA.info(info) or {}).get("toolkit", {})
    if info.get("backend") != "cuda" or tk.get("origin") != "pip":
        return []
    from ggml_patch import cuda_toolkit

    dirs = [Path(d) for d in tk.get("lib_dirs", []) if isinstance(d, str)]
    found, _ = cuda_toolkit.find_wheels()
    dirs += list(found.lib_dirs) if found else []
    loaded = []
    for name in _CUDA_LIBS:
        path = next((p for d in dirs if d.is_dir() for p in sorted(d.glob(name + ".*"))
                     if cuda_toolkit.SONAME_RE.match(p.name)), None)
        if path is None:
            raise RuntimeMissingError(f"this CUDA runtime was built with the pip CUDA wheels, but {name}.* is in "
                                      f"none of {', '.join(map(str, dirs)) or 'their directories'}",
                                      cuda_toolkit.EXTRA_HINT)
        try:
            _preloaded.append(ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL))
        except OSError as e:
            raise RuntimeMissingError(f"cannot load {path}: {e}", cuda_toolkit.EXTRA_HINT) from None
        loaded.append(path)
    return loaded


_log_callback: Any = None  # kept alive for the process: llama.cpp holds the pointer


_log_taps: list[list[str]] = []


@contextlib.contextmanager
def captured_log() -> Iterator[list[str]]:
    """Collect the llama.cpp / ggml log text emitted inside the block (e.g. the buffer types a load used); it
    still reaches stderr only when verbose."""
    tap: list[str] = []
    _log_taps.append(tap)
    try:
        yield tap
    finally:
        _log_taps.remove(tap)


_log_echo: bool | None = None  # None: DLLM_DEBUG=1 or DLLM_VERBOSE=1 decides


def set_log_echo(enabled: bool | None) -> None:
    """Whether llama.cpp's log text reaches stderr (None: the environment decides, see ``_quiet_logs``). Front ends
    with their own stderr display (``dllm bench``) turn it off; the one log callback stays installed, so
    ``captured_log`` keeps working."""
    global _log_echo
    _log_echo = enabled


def _quiet_logs(llama_cpp: ModuleType) -> None:
    """llama.cpp logs every load and context creation to stderr; show them only with DLLM_DEBUG=1 or
    DLLM_VERBOSE=1 (stderr carries our one-line messages and the live view)."""
    global _log_callback
    verbose = os.environ.get("DLLM_DEBUG") == "1" or os.environ.get("DLLM_VERBOSE") == "1"

    def emit(level: int, text: bytes, user_data: Any) -> None:
        echo = verbose if _log_echo is None else _log_echo
        if not text or not (echo or _log_taps):
            return
        line = text.decode("utf-8", errors="replace")
        for tap in _log_taps:
            tap.append(line)
        if echo:
            sys.stderr.write(line)

    _log_callback = llama_cpp.llama_log_callback(emit)
    llama_cpp.llama_log_set(_log_callback, ctypes.c_void_p(0))


def _marker(cdll: ctypes.CDLL) -> str | None:
    fn = getattr(cdll, "llama_dllm_version", None)
    if fn is None:
        return None
    fn.restype, fn.argtypes = ctypes.c_char_p, []
    raw = fn()
    return raw.decode(errors="replace") if raw else None


def check(backend: str = "auto") -> tuple[str, str, Path]:
    """The build ``load`` would use, without importing it; RuntimeMissingError if there is none."""
    found = candidates(backend)
    if not found:
        raise RuntimeMissingError(_stale_hint(backend), _FIX)
    return found[0]
