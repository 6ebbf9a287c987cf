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


class OutputError(DllmError):
    """An output file or stream cannot be written (permissions, read-only or full disk, missing directory)."""


class StdoutClosed(OutputError):
    """The reader of stdout went away (``dllm run | head -c 1``): end quietly, like a Unix filter."""

    exit_code = 141  # 128 + SIGPIPE, what a filter killed by SIGPIPE reports


def clip(text: object, limit: int = 80, *, quote: bool = True) -> str:
    """User text for a message (``repr`` unless ``quote=False``), cut to about ``limit`` characters: messages
    never echo unbounded input (a 100,000-character prompt must not become a 100,000-character error line)."""
    s = str(text)
    cut = s if len(s) <= limit else s[:limit]
    shown = repr(cut) if quote else cut
    return shown if cut is s else f"{shown}... ({len(s)} characters)"
