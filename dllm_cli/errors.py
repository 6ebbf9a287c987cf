"""Typed errors. Every message says what went wrong and what to do next.

The CLI maps these to exit codes once (``cli/app.py``): ``UsageError`` -> 2, everything else -> 1.
"""
from __future__ import annotations


class DllmError(Exception):
    """Base of every error dllm reports to a user; ``str(err)`` is the one-line message."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        self.message = message
        self.hint = hint
        super().__init__(f"{message} ({hint})" if hint else message)


class UsageError(DllmError):
    """Bad flags or arguments (exit 2)."""

    exit_code = 2


class ConvertError(DllmError):
    """A checkpoint cannot be converted (missing files, bad tensors, unsupported architecture)."""


class ModelError(DllmError):
    """A model file or alias cannot be used (missing, corrupt, wrong architecture)."""


class RegistryError(DllmError):
    """models.toml is malformed or an alias is unknown."""


class RuntimeMissingError(DllmError):
    """The patched llama.cpp runtime is missing, stale or failed to load."""


class BuildError(DllmError):
    """Building the patched runtime failed."""


class ContextFullError(DllmError):
    """A request does not fit the context window."""


class DecodeError(DllmError):
    """A llama.cpp decode call failed or was refused before it could abort the process."""
