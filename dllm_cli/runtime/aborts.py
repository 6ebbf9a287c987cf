"""Turn a ggml abort into one line on stderr and exit 1, with partial output files removed.

dllm checks every precondition it knows before calling llama.cpp, but some failures can only happen inside it: an
RPC worker that dies mid-decode trips ``RPC_STATUS_ASSERT``, which calls ``ggml_abort``. ggml then prints a gdb
backtrace and raises SIGABRT (exit 134). ``ggml_set_abort_callback`` runs our handler first: it deletes the
``.part`` files registered with ``partial``, prints one line naming the likely fix, and ends the process with
exit status 1 (a C++ frame cannot be unwound into a Python exception).
"""
from __future__ import annotations

import ctypes
import os
import shutil
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

_CALLBACK = ctypes.CFUNCTYPE(None, ctypes.c_char_p)  # void (*ggml_abort_callback_t)(const char * error_message)
_installed: Any = None
_partials: set[Path] = set()
_lock = threading.Lock()


@contextmanager
def partial(path: Path) -> Iterator[Path]:
    """Register ``path`` (a ``.part`` file being written) for removal if ggml aborts while it exists."""
    with _lock:
        _partials.add(path)
    try:
        yield path
    finally:
        with _lock:
            _partials.discard(path)


def explain(message: str) -> str:
    """The one-line error for a ggml abort message (``file:line: text``)."""
    text = message.split(": ", 1)[-1].strip() or message.strip()
    if "RPC" in message or "ggml-rpc" in message:
        return (f"error: an RPC worker failed mid-run ({text[:200]}) (check that every --rpc worker is running "
                "and reachable, then rerun)")
    return (f"error: llama.cpp stopped on an internal check: {text[:200]} (this input got past dllm's checks: "
            "please report it; DLLM_DEBUG=1 shows more)")


def _on_abort(raw: bytes | None) -> None:
    message = (raw or b"").decode("utf-8", errors="replace")
    with _lock:
        for p in list(_partials):
            try:
                if p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
            except OSError:
                pass
    try:
        sys.stderr.write(explain(message) + "\n")
        sys.stderr.flush()
    finally:
        os._exit(1)


def install(libdir: Path) -> None:
    """Set the abort callback in the loaded ``libggml-base`` (once per process)."""
    global _installed
    if _installed is not None:
        return
    for name in ("libggml-base.so", "libggml-base.dylib", "ggml-base.dll"):
        if (libdir / name).exists():
            base = ctypes.CDLL(str(libdir / name))
            break
    else:
        return
    fn = getattr(base, "ggml_set_abort_callback", None)
    if fn is None:
        return
    fn.restype, fn.argtypes = ctypes.c_void_p, [_CALLBACK]
    _installed = _CALLBACK(_on_abort)  # kept alive for the process: ggml holds the pointer
    fn(_installed)
