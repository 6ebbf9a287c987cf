"""NVIDIA's CUDA backend: the toolkit (system or the ``[cuda]`` extra's pip wheels, see ``cuda_toolkit``) and the
architectures it compiles for. ``auto`` picks it where an NVIDIA driver and an ``nvcc`` are present."""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ggml_patch import cuda_toolkit
from ggml_patch.backends.base import Backend, Setup, Status, error


def driver() -> bool:
    """An NVIDIA kernel driver is loaded (or its tools are installed)."""
    return Path("/proc/driver/nvidia/version").exists() or shutil.which("nvidia-smi") is not None


@dataclass(frozen=True)
class CudaSetup(Setup):
    """What a CUDA build compiles with: the toolkit, the CMake toolkit root (assembled for the wheels) and the
    architectures (``80-real;90`` ...), with where they came from (option | native | default)."""
    toolkit: cuda_toolkit.Toolkit
    root: Path
    archs: str
    arch_source: str = "option"

    def cmake_flags(self, flags: list[str]) -> list[str]:
        """The architectures, compiler and toolkit root, and the wheel library directories in the RPATH."""
        out = [f"-DCMAKE_INSTALL_RPATH={cuda_toolkit.rpath(self.toolkit)}"
               if f.startswith("-DCMAKE_INSTALL_RPATH=") else f for f in flags]
        return out + cuda_toolkit.cmake_flags(self.toolkit, self.root, self.archs)

    def describe(self) -> dict:
        return {"archs": self.archs, "arch_source": self.arch_source, "toolkit": self.toolkit.describe()}


def cuda_setup(cuda_arch: str | None = None, toolkit: str = "auto", status: Status | None = None,
               dirs: list[Path] | None = None, home: Path | None = None) -> CudaSetup:
    """Validate ``cuda_arch`` (UsageError), find the toolkit (BuildError naming ``pip install 'dllm-cli[cuda]'``),
    assemble a CMake root for wheels under ``home/cuda-toolkit`` and check the architectures against it."""
    archs, source = cuda_toolkit.resolve_archs(cuda_arch)
    tk = cuda_toolkit.probe_version(cuda_toolkit.require(toolkit, dirs))
    low = [a for a in cuda_toolkit.arch_numbers(archs) if a < cuda_toolkit.MIN_ARCH_CUDA13]
    if (tk.major or 0) >= 13 and low:
        raise error("BuildError", f"CUDA {tk.version} ({tk.origin}) cannot compile for architecture "
                    f"{', '.join(map(str, low))} (CUDA 13 starts at 75)",
                    "drop it from --cuda-arch, or build with a CUDA 12 system toolkit")
    root = tk.home
    if tk.origin == "pip":
        if status:
            status(f"assembling a CUDA toolkit root from the pip wheels ({tk.version})")
        if home is None:
            from ggml_patch.build import home as dllm_home
            home = dllm_home()
        root = cuda_toolkit.assemble_root(tk, home / "cuda-toolkit")
    return CudaSetup(tk, root, archs, source)


def _record(build: dict) -> tuple[dict, dict]:
    """build.json's ``cuda`` and ``cuda.toolkit`` objects ({} when absent or malformed)."""
    raw = build.get("cuda")
    cuda: dict = raw if isinstance(raw, dict) else {}
    raw_tk = cuda.get("toolkit")
    return cuda, (raw_tk if isinstance(raw_tk, dict) else {})


class CudaBackend(Backend):
    name = "cuda"
    flags = ("-DGGML_CUDA=ON",)
    variable_flags = ("-DCMAKE_CUDA_ARCHITECTURES=", "-DCMAKE_CUDA_COMPILER=", "-DCUDAToolkit_ROOT=")
    auto_help = "cuda with an NVIDIA driver and nvcc (system or the [cuda] extra's pip wheels)"

    def present(self) -> bool:
        # the driver check matters: a toolkit without a GPU (CI images, build boxes) would otherwise get an
        # hour-long CUDA compile of a library that cannot load there
        return driver() and (shutil.which("nvcc") is not None or cuda_toolkit.find("auto") is not None)

    def setup(self, status: Status, options: dict[str, Any]) -> Setup:
        return cuda_setup(options.get("cuda_arch"), options.get("cuda_toolkit_source") or "auto", status)

    def info(self, build: dict[str, Any]) -> dict[str, Any] | None:
        """The architectures and toolkit a CUDA build recorded (builds made before they were recorded show
        ``unknown``)."""
        if build.get("backend") != "cuda":
            return None
        cuda, tk = _record(build)
        return {"archs": cuda.get("archs", "unknown"), "arch_source": cuda.get("arch_source", "unknown"),
                "toolkit": {"origin": tk.get("origin", "unknown"), "version": tk.get("version", "unknown"),
                            **{k: tk[k] for k in ("nvcc", "packages", "lib_dirs") if k in tk}}}

    def info_lines(self, info: dict[str, Any] | None) -> list[str]:
        """``cuda archs`` and ``cuda toolkit`` lines."""
        if not info:
            return []
        tk = info["toolkit"]
        origin = {"pip": "pip wheels", "system": "system"}.get(tk["origin"], tk["origin"])
        where = f", {tk['nvcc']}" if tk.get("nvcc") else ""
        pkgs = tk.get("packages") or {}
        shown = ", ".join(f"{n} {v}" for n, v in pkgs.items()
                          if n in ("nvidia-cuda-runtime", "nvidia-cublas", "nvidia-cuda-runtime-cu12",
                                   "nvidia-cublas-cu12"))
        return [f"{'cuda archs':17} {info['archs']} ({info['arch_source']})",
                f"{'cuda toolkit':17} {origin} {tk['version']}{where}" + (f" ({shown})" if shown else "")]


CUDA = CudaBackend()
