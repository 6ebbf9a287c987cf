"""The interface every backend module implements (``Backend``) and what its toolchain discovery returns
(``Setup``)."""
from __future__ import annotations

from typing import Any, Callable

Status = Callable[[str], None]


def error(kind: str, message: str, hint: str | None = None) -> Exception:
    """dllm's typed error (``BuildError``, ``UsageError``) when the package is importable, else RuntimeError (only
    before dllm is installed: ``python -m ggml_patch.build`` from the Makefile)."""
    try:
        from dllm_cli import errors
        return getattr(errors, kind)(message, hint)  # type: ignore[no-any-return]
    except ImportError:  # pragma: no cover - only before dllm is installed
        return RuntimeError(f"{message} ({hint})" if hint else message)


class Setup:
    """A backend's toolchain as found for one build: extra CMake flags, parts of the cache key (toolchain
    versions), and the record ``build.json`` keeps under the backend's name (shown by ``dllm runtime info``)."""

    def cmake_flags(self, flags: list[str]) -> list[str]:
        """``flags`` (the backend's and the shared ones) with this toolchain's options added or replaced."""
        return flags

    def key_parts(self) -> dict[str, str]:
        """Versions that change the built library without changing a flag (glslc, the Vulkan headers)."""
        return {}

    def describe(self) -> dict[str, Any]:
        return {}


class Backend:
    """One ggml backend. Subclasses override what differs; the defaults fit a backend with no toolchain."""

    name = ""
    flags: tuple[str, ...] = ()          # CMake options (-DGGML_X=ON)
    patches: tuple[str, ...] = ()        # patch files applied to this backend's builds only
    variable_flags: tuple[str, ...] = ()  # flag prefixes that differ between builds (in the key, not compared)
    auto_help = ""                       # when ``auto`` picks it (``dllm runtime build --help``)

    def present(self) -> bool:
        """Whether ``auto`` should build this backend here: a usable device and a toolchain to build for it."""
        return False

    def setup(self, status: Status, options: dict[str, Any]) -> Setup:
        """Find and check the toolchain (BuildError naming the package that is missing)."""
        return Setup()

    def info(self, build: dict[str, Any]) -> dict[str, Any] | None:
        """What ``dllm runtime info --json`` shows for a build of this backend (None: nothing beyond the common
        fields), from its ``build.json``."""
        return None

    def info_lines(self, info: dict[str, Any] | None) -> list[str]:
        """The text lines of ``dllm runtime info`` for ``info()``'s result."""
        return []

    def prepare_load(self, build: dict[str, Any], explicit: bool) -> list[str]:
        """Set up the process before the library loads (environment, preloads); returns warnings to show.
        ``explicit``: the user named this backend (``--backend``, ``DLLM_BACKEND``) rather than ``auto``."""
        return []
