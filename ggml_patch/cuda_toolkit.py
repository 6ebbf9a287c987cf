"""The CUDA toolkit behind ``dllm runtime build --backend cuda``, and the architectures it compiles for.

Two sources of ``nvcc``, in this order:

- **system**: ``nvcc`` on PATH, else ``$CUDA_HOME``/``$CUDA_PATH``/``/usr/local/cuda`` ``/bin/nvcc``;
- **pip wheels** (the ``[cuda]`` extra): NVIDIA's wheels unpack under ``site-packages/nvidia/``. CUDA 13 wheels
  share one tree, ``nvidia/cu13/{bin,include,lib,nvvm}``, and ``nvidia-cuda-nvcc`` carries the whole compiler
  (nvcc, cicc, ptxas, fatbinary, nvlink, cudafe++). The CUDA 12 wheels use one tree per package
  (``nvidia/cuda_nvcc``, ``nvidia/cuda_runtime``, ``nvidia/cublas``, ``nvidia/cuda_cccl``), but
  ``nvidia-cuda-nvcc-cu12`` ships only ptxas and libnvvm (no ``nvcc``, no ``cicc``: checked for 12.0 to 12.9), so a
  CUDA 12 wheel set cannot compile; that layout is still recognised in case a complete one is installed.

CMake's FindCUDAToolkit wants one root with ``bin/nvcc``, ``include/``, ``lib/libcudart.so``, ``lib/libcublas.so``
and ``lib/stubs/libcuda.so``. The wheels have versioned sonames only (``libcudart.so.13``) and no driver stub, so
``assemble_root`` builds such a root out of symlinks in the build cache, plus a generated ``libcuda.so`` stub (soname
``libcuda.so.1``, every driver entry point of the wheel's ``cuda.h`` returning an error) to link against; at run time
the system driver's ``libcuda.so.1`` is used. The built libraries get the wheel ``lib`` directories in their RPATH
(and ``dllm_cli.runtime.library`` preloads libcudart/libcublas from the wheels when those moved).
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ggml_patch.staging import staged_dir

EXTRA_HINT = "pip install 'dllm-cli[cuda]'"

# Real GPU architectures nvcc knows (compute capability x10). A value outside this set is a typo (8.6, 860, sm_86).
KNOWN_ARCHS = frozenset({50, 52, 53, 60, 61, 62, 70, 72, 75, 80, 86, 87, 88, 89, 90,
                         100, 101, 103, 110, 120, 121})
ARCH_RE = re.compile(r"^(\d{2,3})([af]?)(-real|-virtual)?$")
# Used when no GPU is visible (build boxes, containers without the driver mounted). Machine code for each current
# family: A100 (80), RTX 30 / A10 / A40 (86), RTX 40 / L4 / L40 (89), H100 / H200 (90); PTX for Turing (T4, RTX 20),
# JIT-compiled once by the driver, and compute_90 PTX ("90" = 90-real + 90-virtual) so Blackwell runs through JIT.
# Six device compilations per .cu file, against ten for plain 75;80;86;89;90.
DEFAULT_ARCHS = "75-virtual;80-real;86-real;89-real;90"
MIN_ARCH_CUDA13 = 75  # CUDA 13 dropped Maxwell, Pascal and Volta
TOOLKIT_CHOICES = ("auto", "system", "pip")


def _error(kind: str, message: str, hint: str | None = None) -> Exception:
    try:
        from dllm_cli import errors
        return getattr(errors, kind)(message, hint)
    except ImportError:  # pragma: no cover - only before dllm is installed
        return RuntimeError(f"{message} ({hint})" if hint else message)


def _clip(text: str, limit: int = 40) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


# --- architectures ----------------------------------------------------------------------------------------------
def parse_archs(text: str) -> str:
    """Validate ``--cuda-arch``: ``native``, or architectures separated by ``;`` or ``,`` (``86``, ``90-real``,
    ``75-virtual``, ``120a-real``). Returns the canonical ``;``-joined list; UsageError (exit 2) otherwise."""
    raw = text.strip()
    if raw.lower() == "native":
        return "native"
    items = [t for t in re.split(r"[;,\s]+", raw) if t]
    if not items:
        raise _error("UsageError", "--cuda-arch is empty", "use native or a list such as 80;86;90")
    out: list[str] = []
    for item in items:
        m = ARCH_RE.match(item.lower())
        if not m or int(m.group(1)) not in KNOWN_ARCHS:
            raise _error("UsageError", f"--cuda-arch: {_clip(item)} is not a CUDA architecture",
                         f"use native or compute capabilities x10 such as 75;80;86;89;90 "
                         f"(optionally -real or -virtual), known: {', '.join(map(str, sorted(KNOWN_ARCHS)))}")
        if item.lower() not in out:
            out.append(item.lower())
    return ";".join(out)


def visible_gpu_archs() -> list[str]:
    """``NN-real`` for each distinct GPU ``nvidia-smi`` reports (compute capability ``8.6`` -> ``86-real``)."""
    smi = shutil.which("nvidia-smi")
    if not smi:
        return []
    try:
        res = subprocess.run([smi, "--query-gpu=compute_cap", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return []
    archs = []
    for line in res.stdout.splitlines() if res.returncode == 0 else []:
        m = re.fullmatch(r"\s*(\d+)\.(\d)\s*", line)
        if m and f"{m.group(1)}{m.group(2)}-real" not in archs:
            archs.append(f"{m.group(1)}{m.group(2)}-real")
    return sorted(archs, key=lambda a: int(a.split("-")[0]))


def resolve_archs(requested: str | None) -> tuple[str, str]:
    """(architecture list for CMake, where it came from: option | native | default).

    ``native`` is resolved here, from ``nvidia-smi``, rather than handed to CMake: the list is part of the build
    key, so a runtime built for one GPU is not mistaken for one built for another.
    """
    if requested is not None:
        archs = parse_archs(requested)
        if archs != "native":
            return archs, "option"
        visible = visible_gpu_archs()
        if not visible:
            raise _error("BuildError", "--cuda-arch native: no GPU is visible (nvidia-smi reports none)",
                         "pass a list such as --cuda-arch 80;86;90")
        return ";".join(visible), "native"
    visible = visible_gpu_archs()
    if visible:
        return ";".join(visible), "native"
    return DEFAULT_ARCHS, "default"


def arch_numbers(archs: str) -> list[int]:
    return [int(m.group(1)) for a in archs.split(";") if (m := ARCH_RE.match(a))]


# --- toolkits ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Toolkit:
    origin: str                              # "system" or "pip"
    nvcc: Path
    home: Path                               # system: the toolkit root; pip: the site-packages dir holding nvidia/
    version: str = ""                        # "13.5.37"; "" until probed (system)
    include_dirs: tuple[Path, ...] = ()      # pip: the wheels' include directories
    lib_dirs: tuple[Path, ...] = ()          # pip: where libcudart / libcublas live (the runtime RPATH)
    nvvm: Path | None = None                 # pip: the nvvm directory (cicc, libdevice)
    packages: tuple[tuple[str, str], ...] = field(default=())   # pip: (distribution, version)

    @property
    def major(self) -> int | None:
        m = re.match(r"(\d+)", self.version)
        return int(m.group(1)) if m else None

    def describe(self) -> dict:
        """What build.json records and ``dllm runtime info`` shows."""
        d: dict = {"origin": self.origin, "version": self.version or "unknown", "nvcc": str(self.nvcc)}
        if self.origin == "pip":
            d["packages"] = dict(self.packages)
            d["lib_dirs"] = [str(p) for p in self.lib_dirs]
        return d


def _system_nvcc_candidates() -> list[Path]:
    out = []
    on_path = shutil.which("nvcc")
    if on_path:
        out.append(Path(on_path))
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            out.append(Path(os.environ[var]) / "bin" / "nvcc")
    out.append(Path("/usr/local/cuda/bin/nvcc"))
    return out


def _executable(p: Path) -> bool:
    return p.is_file() and os.access(p, os.X_OK)


def _system_home(nvcc: Path) -> Path:
    """The toolkit root of a system ``nvcc``: ``bin/..`` of the real file, or of the nvcc a wrapper script execs
    (``/usr/local/bin/nvcc`` containing ``exec /usr/local/cuda-13.0/bin/nvcc "$@"``)."""
    real = nvcc.resolve()
    home = real.parent.parent
    if not (home / "include" / "cuda_runtime.h").is_file() and real.stat().st_size < 4096:
        try:
            text = real.read_text(errors="replace")
        except OSError:
            text = ""
        m = re.search(r"(/\S+)/bin/nvcc\b", text) if text.startswith("#!") else None
        if m:
            return Path(m.group(1)).resolve()
    return home


def _system_include_dirs(home: Path) -> list[Path]:
    return [home / "include", *sorted(home.glob("targets/*/include"))]


def _check_system(tk: Toolkit) -> str | None:
    """What a system toolkit lacks to build ggml-cuda (None when complete): the CUDA runtime and cuBLAS headers.
    (Seen: images with only the compiler packages, e.g. a CUDA 13.0 nvcc without cuBLAS.)"""
    inc = _system_include_dirs(tk.home)
    missing = [what for header, what in (("cuda_runtime.h", "the CUDA runtime headers"), ("cublas_v2.h", "cuBLAS"))
               if not any((d / header).is_file() for d in inc)]
    return f"the system toolkit {tk.home} (nvcc {tk.nvcc}) has no {' and no '.join(missing)}" if missing else None


def _system_candidates() -> list[Toolkit]:
    out: list[Toolkit] = []
    for nvcc in _system_nvcc_candidates():
        if _executable(nvcc):
            home = _system_home(nvcc)
            if all(t.home != home for t in out):
                out.append(Toolkit("system", nvcc, home))
    return out


def find_system() -> tuple[Toolkit | None, str | None]:
    """(the first complete system toolkit, None) or (None, why the ones found cannot build, or None if none).
    No subprocess: the version is probed by ``probe_version`` when building."""
    why = None
    for tk in _system_candidates():
        problem = _check_system(tk)
        if problem is None:
            return tk, None
        why = why or problem
    return None, why


def probe_version(tk: Toolkit) -> Toolkit:
    """``tk`` with its version from ``nvcc --version`` when it has none (``release 12.4, V12.4.131``)."""
    if tk.version:
        return tk
    try:
        out = subprocess.run([str(tk.nvcc), "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        out = ""
    m = re.search(r"release (\d+\.\d+)(?:, V(\d+(?:\.\d+)*))?", out)
    version = (m.group(2) or m.group(1)) if m else ""
    return Toolkit(tk.origin, tk.nvcc, tk.home, version, tk.include_dirs, tk.lib_dirs, tk.nvvm, tk.packages)


def search_dirs() -> list[Path]:
    """Where to look for ``nvidia/``: ``$DLLM_CUDA_WHEELS`` (``os.pathsep``-separated, e.g. a ``pip install
    --target`` directory), then ``sys.path`` (site-packages, the user site, PYTHONPATH entries)."""
    env = os.environ.get("DLLM_CUDA_WHEELS", "")
    dirs = [Path(p) for p in env.split(os.pathsep) if p] + [Path(p) for p in sys.path if p]
    seen, out = set(), []
    for d in dirs:
        if str(d) not in seen:
            seen.add(str(d))
            out.append(d)
    return out


def _dists(site: Path) -> dict[str, str]:
    """The ``nvidia-*`` distributions installed in ``site``: name -> version, from the dist-info directory names."""
    out = {}
    for d in site.glob("nvidia_*.dist-info"):
        name, _, version = d.name[: -len(".dist-info")].partition("-")
        out[name.replace("_", "-")] = version
    return dict(sorted(out.items()))


def _has(dirs: tuple[Path, ...], pattern: str) -> bool:
    return any(next(d.glob(pattern), None) is not None for d in dirs if d.is_dir())


def _check_wheel_set(tk: Toolkit) -> str | None:
    """What a wheel toolkit lacks to build ggml-cuda (None when complete)."""
    needs = [(tk.include_dirs, "cuda_runtime.h", "nvidia-cuda-runtime"),
             (tk.include_dirs, "cublas_v2.h", "nvidia-cublas"),
             (tk.include_dirs, "cuda.h", "nvidia-cuda-runtime"),
             (tk.lib_dirs, "libcudart.so*", "nvidia-cuda-runtime"),
             (tk.lib_dirs, "libcublas.so*", "nvidia-cublas"),
             (tk.lib_dirs, "libcublasLt.so*", "nvidia-cublas")]
    missing = sorted({pkg for dirs, pattern, pkg in needs if not _has(dirs, pattern)})
    if tk.nvvm is None or not (tk.nvvm / "bin").is_dir():
        missing.append("nvidia-nvvm (cicc)")
    return f"{tk.nvcc.parent} lacks {', '.join(missing)}" if missing else None


def _wheel_candidates(site: Path) -> list[Toolkit]:
    nv = site / "nvidia"
    if not nv.is_dir():
        return []
    dists = _dists(site)
    out = []
    merged = sorted((p for p in nv.glob("cu[0-9]*") if p.is_dir() and p.name[2:].isdigit()),
                    key=lambda p: -int(p.name[2:]))  # newest CUDA first
    for root in merged:  # CUDA 13+: one tree
        nvcc = root / "bin" / "nvcc"
        if _executable(nvcc):
            suffix = root.name  # cu13
            version = dists.get("nvidia-cuda-nvcc") or dists.get(f"nvidia-cuda-nvcc-{suffix}") or ""
            pkgs = tuple((n, v) for n, v in dists.items() if not re.search(r"-cu\d+$", n) or n.endswith(suffix))
            out.append(Toolkit("pip", nvcc, site, version, (root / "include",), (root / "lib",), root / "nvvm", pkgs))
    nvcc = nv / "cuda_nvcc" / "bin" / "nvcc"  # CUDA 12: one tree per package
    if _executable(nvcc):
        parts = ("cuda_nvcc", "cuda_runtime", "cublas", "cuda_cccl", "cuda_nvrtc")
        inc = tuple(nv / p / "include" for p in parts if (nv / p / "include").is_dir())
        lib = tuple(nv / p / "lib" for p in ("cuda_runtime", "cublas") if (nv / p / "lib").is_dir())
        version = dists.get("nvidia-cuda-nvcc-cu12") or dists.get("nvidia-cuda-nvcc") or ""
        pkgs = tuple((n, v) for n, v in dists.items() if n.endswith("-cu12"))
        out.append(Toolkit("pip", nvcc, site, version, inc, lib, nv / "cuda_nvcc" / "nvvm", pkgs))
    return out


def find_wheels(dirs: list[Path] | None = None) -> tuple[Toolkit | None, str | None]:
    """(the first complete wheel toolkit, None) or (None, why the wheels found cannot build, or None if none)."""
    why = None
    for site in search_dirs() if dirs is None else dirs:
        for tk in _wheel_candidates(site):
            problem = _check_wheel_set(tk)
            if problem is None:
                return tk, None
            why = why or problem
        if why is None and (site / "nvidia" / "cuda_nvcc").is_dir() and not (site / "nvidia" / "cu13").is_dir():
            why = (f"{site / 'nvidia' / 'cuda_nvcc'} (nvidia-cuda-nvcc-cu12) has no nvcc: the CUDA 12 wheels "
                   f"carry only ptxas")
    return None, why


def find(prefer: str = "auto", dirs: list[Path] | None = None) -> Toolkit | None:
    """The toolkit to build with: ``system`` or ``pip`` only, or ``auto`` (system first, then the wheels)."""
    if prefer not in TOOLKIT_CHOICES:
        raise _error("UsageError", f"--cuda-toolkit must be one of {', '.join(TOOLKIT_CHOICES)}, got {prefer!r}")
    if prefer in ("auto", "system"):
        tk = find_system()[0]
        if tk is not None or prefer == "system":
            return tk
    return find_wheels(dirs)[0]


def require(prefer: str = "auto", dirs: list[Path] | None = None) -> Toolkit:
    """``find`` or a BuildError whose hint names the fix."""
    tk = find(prefer, dirs)
    if tk is not None:
        return tk
    why_system = find_system()[1] if prefer != "pip" else None
    why_wheels = find_wheels(dirs)[1] if prefer != "system" else None
    where = {"system": "on PATH, in $CUDA_HOME or /usr/local/cuda",
             "pip": "in the nvidia pip wheels",
             "auto": "on PATH, in $CUDA_HOME, /usr/local/cuda or the nvidia pip wheels"}[prefer]
    whys = "; ".join(w for w in (why_system, why_wheels) if w)
    if why_system:  # an nvcc exists, but its toolkit cannot build ggml-cuda
        msg = f"no complete CUDA toolkit: {whys}" + (", and no nvidia pip wheels" if prefer == "auto" and
                                                      not why_wheels else "")
    else:
        msg = f"no CUDA compiler (nvcc) {where}" + (f" ({whys})" if whys else "")
    hint = "install the full CUDA toolkit (with cuBLAS), or use --cuda-toolkit pip" if prefer == "system" \
        else EXTRA_HINT
    raise _error("BuildError", msg, hint)


# --- a FindCUDAToolkit-shaped root for the wheels ---------------------------------------------------------------
def _link_entries(src: Path, dest: Path) -> None:
    """Symlink every entry of ``src`` into ``dest`` (an existing name wins)."""
    dest.mkdir(parents=True, exist_ok=True)
    for p in sorted(src.iterdir()) if src.is_dir() else []:
        if p.name in ("__init__.py", "__pycache__"):
            continue
        if not (dest / p.name).exists() and not (dest / p.name).is_symlink():
            (dest / p.name).symlink_to(p)


SONAME_RE = re.compile(r"^(lib[\w+-]+?\.so)\.\d+(\.\d+)*$")


def driver_symbols(cuda_h_dirs: tuple[Path, ...], cc: str) -> list[str]:
    """The driver API entry points declared in ``cuda.h`` after its versioning macros (``cuMemGetInfo_v2``)."""
    args = [cc, "-E", "-P", *(f"-I{d}" for d in cuda_h_dirs), "-x", "c", "-"]
    res = subprocess.run(args, input="#include <cuda.h>\n", capture_output=True, text=True, timeout=120)
    if res.returncode != 0:
        raise _error("BuildError", f"cannot preprocess the wheels' cuda.h with {cc}: "
                     f"{(res.stderr.strip().splitlines() or ['failed'])[-1][:200]}")
    return sorted(set(re.findall(r"\bCUresult\s+(cu[A-Za-z0-9_]+)\s*\(", res.stdout)))


def write_driver_stub(dest: Path, symbols: list[str], cc: str) -> Path:
    """``dest/libcuda.so`` (soname ``libcuda.so.1``): link-time stand-in for the driver, like the toolkit's stubs."""
    dest.mkdir(parents=True, exist_ok=True)
    src = dest / "libcuda-stub.c"
    src.write_text("/* generated by dllm: link-time stub of the CUDA driver; the real libcuda.so.1 loads at run time */\n"
                   + "".join(f"int {s}(void) {{ return 999; }}\n" for s in symbols))  # 999 = CUDA_ERROR_UNKNOWN
    out = dest / "libcuda.so"
    res = subprocess.run([cc, "-shared", "-fPIC", "-o", str(out), "-Wl,-soname,libcuda.so.1", str(src)],
                         capture_output=True, text=True, timeout=300)
    if res.returncode != 0:
        raise _error("BuildError", f"cannot build the libcuda stub with {cc}: "
                     f"{(res.stderr.strip().splitlines() or ['failed'])[-1][:200]}")
    return out


def c_compiler() -> str:
    for c in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if c and shutil.which(c):
            return c
    raise _error("BuildError", "no C compiler (cc, gcc or clang) on PATH", "install one, e.g. apt install build-essential")


def root_name(tk: Toolkit) -> str:
    tag = hashlib.sha256(repr((str(tk.nvcc), tk.version, [str(d) for d in tk.include_dirs],
                               [str(d) for d in tk.lib_dirs], str(tk.nvvm))).encode()).hexdigest()[:12]
    return f"pip-{tk.version or 'unknown'}-{tag}"


def assemble_root(tk: Toolkit, parent: Path, cc: str | None = None) -> Path:
    """``parent/<name>``: ``bin/`` (the wheel's nvcc and friends), ``include/``, ``lib/`` with unversioned
    ``libX.so`` links and ``lib/stubs/libcuda.so``, ``lib64`` -> ``lib``, ``nvvm``. Built once, atomically."""
    root = parent / root_name(tk)
    if (root / ".complete").is_file():
        return root
    with staged_dir(root) as tmp:
        _link_entries(tk.nvcc.parent, tmp / "bin")
        for d in tk.include_dirs:
            _link_entries(d, tmp / "include")
        lib = tmp / "lib"
        for d in tk.lib_dirs:
            _link_entries(d, lib)
        lib.mkdir(exist_ok=True)
        for p in sorted(lib.iterdir()):
            m = SONAME_RE.match(p.name)
            if m and not (lib / m.group(1)).exists():
                (lib / m.group(1)).symlink_to(p.resolve())
        (tmp / "lib64").symlink_to("lib")
        if tk.nvvm is not None and not (tmp / "nvvm").exists():
            (tmp / "nvvm").symlink_to(tk.nvvm)
        cc = cc or c_compiler()
        write_driver_stub(lib / "stubs", driver_symbols((tmp / "include",), cc), cc)
        (tmp / ".complete").write_text(f"{tk.nvcc}\n")
    return root


def cmake_flags(tk: Toolkit, root: Path, archs: str) -> list[str]:
    """CUDA options for CMake: the architectures, the compiler and the toolkit root (``root``: the assembled one for
    the wheels, the toolkit itself for a system install)."""
    nvcc = root / "bin" / "nvcc"  # the toolkit's own nvcc rather than a wrapper script found on PATH
    if tk.origin != "pip" and not _executable(nvcc):
        nvcc = tk.nvcc
    return [f"-DCMAKE_CUDA_ARCHITECTURES={archs}", f"-DCMAKE_CUDA_COMPILER={nvcc}", f"-DCUDAToolkit_ROOT={root}"]


def rpath(tk: Toolkit) -> str:
    """``CMAKE_INSTALL_RPATH``: ``$ORIGIN`` plus, for the wheels, their ``lib`` directories (libcudart, libcublas)."""
    return ";".join(["$ORIGIN", *(str(d) for d in tk.lib_dirs)] if tk.origin == "pip" else ["$ORIGIN"])
