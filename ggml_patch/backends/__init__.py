"""The backends a runtime can be built for, one small module each, behind one interface (``Backend``).

A backend supplies its CMake flags, the patches that apply only to its builds, its toolchain discovery (a
``Setup`` whose flags and key parts enter the cache key and whose ``describe()`` goes to ``build.json``), whether
``auto`` should pick it on this machine, and the lines ``dllm runtime info`` shows for it. ``ggml_patch.build`` is
the shared driver (sdist, patches, CMake, key, install); adding a backend is one new module registered here.
"""
from __future__ import annotations

from ggml_patch.backends.base import Backend, Setup, error
from ggml_patch.backends.cpu import CPU
from ggml_patch.backends.cuda import CUDA
from ggml_patch.backends.metal import METAL
from ggml_patch.backends.vulkan import VULKAN

REGISTRY: dict[str, Backend] = {b.name: b for b in (CPU, CUDA, METAL, VULKAN)}
NAMES: tuple[str, ...] = tuple(REGISTRY)
# ``auto`` asks in this order; the first backend present on the machine wins, cpu always is
AUTO_ORDER: tuple[str, ...] = ("cuda", "metal", "vulkan", "cpu")


def get(name: str) -> Backend:
    """The backend called ``name``; BuildError naming the known ones otherwise."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise error("BuildError", f"unknown backend {name!r}", f"use one of auto, {', '.join(NAMES)}") from None


def backend_only_patches() -> dict[str, str]:
    """Patch file name -> the one backend whose builds apply it (the others leave it out of tree and key)."""
    return {p: b.name for b in REGISTRY.values() for p in b.patches}


__all__ = ["AUTO_ORDER", "Backend", "NAMES", "REGISTRY", "Setup", "backend_only_patches", "error", "get"]
