"""Turn a ggml abort into one line on stderr and exit 1, with partial output files removed.

dllm checks every precondition it knows before calling llama.cpp, but some failures can only happen inside it: an
RPC worker that dies mid-decode trips ``RPC_STATUS_ASSERT``, which calls ``ggml_abort``. ggml then prints a gdb
backtrace and raises SIGABRT (exit 134). ``ggml_set_abort_callback`` runs our handler first: it deletes the
``.part`` files registered with ``partial``, prints one line naming the likely fix, and ends the process with
exit status 1 (a C++ frame cannot be unwound into a Python exception).

A memory-mapped file that shrinks while in use (a model truncated under a running ``dllm``) ends in SIGBUS;
``install_fault_handler`` gives it the same treatment: partial files removed, one line, exit 1.
"""
from __future__ import annotations

import ctypes
import os
import shutil
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from dllm_cli.printable import printable

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


def remove_partials() -> None:
    """Remove every partial file still registered: at exit, one whose writer did not finish (its own cleanup
    cut short by a second signal). Never raises."""
    _remove_partials()


def _remove_partials() -> None:
    locked = _lock.acquire(timeout=1.0)  # never wait forever inside an abort or a fault
    try:
        for p in list(_partials):
            try:
                if p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
            except OSError:
                pass
    finally:
        if locked:
            _lock.release()


_dying = threading.Lock()


def _die(line: str) -> None:
    """Remove the registered partial files, print ``line``, end the process with exit status 1. Several
    threads can fault at once (ggml's workers all read the shrunken file): the first one does this, the others
    wait for the end (a write releases the GIL, and a second line would follow)."""
    if not _dying.acquire(blocking=False):
        while True:
            time.sleep(60)
    _remove_partials()
    try:
        sys.stderr.write(printable(line, lines=False) + "\n")  # the line may echo a file name or ggml text
        sys.stderr.flush()
    finally:
        os._exit(1)


def _on_abort(raw: bytes | None) -> None:
    _die(explain((raw or b"").decode("utf-8", errors="replace")))


# --- SIGBUS: a memory-mapped file that shrank -----------------------------------------------------------
# llama.cpp maps the model (and gguf-py / numpy map the files dllm reads). A file truncated while mapped makes
# the next read of a page past its new end raise SIGBUS, whose default action kills the process without any
# cleanup. Python's own signal handling cannot help: its C handler only sets a flag and returns, the faulting
# load runs again, and it faults again. So a C-level handler is installed through libc's signal(): a ctypes
# callback that removes the partial files, prints one line and calls _exit(1), never returning to the fault.
_SIG_HANDLER = ctypes.CFUNCTYPE(None, ctypes.c_int)  # void (*sighandler_t)(int)
_bus_handler: Any = None
_mapped: list[Path] = []


def mapped(path: Path) -> None:
    """Name ``path`` in the SIGBUS message: a file that is memory-mapped from now on (the loaded model)."""
    if path not in _mapped:
        _mapped.append(path)


def bus_message() -> str:
    names = ", ".join(str(p) for p in _mapped[-3:]) or "the model or an input file"
    return (f"error: a file dllm had mapped into memory shrank while in use ({names[:300]}): it was truncated or "
            "replaced (do not change input files while dllm runs; re-download or re-convert it)")


def _on_bus(_signum: int) -> None:
    _die(bus_message())


def install_fault_handler() -> None:
    """Handle SIGBUS as above (once per process; where the platform has SIGBUS and a C library)."""
    global _bus_handler
    import signal

    if _bus_handler is not None or not hasattr(signal, "SIGBUS"):
        return
    try:
        libc = ctypes.CDLL(None)
        fn = libc.signal
    except (OSError, AttributeError):
        return
    fn.restype, fn.argtypes = ctypes.c_void_p, [ctypes.c_int, _SIG_HANDLER]
    _bus_handler = _SIG_HANDLER(_on_bus)  # kept alive for the process: the kernel calls it
    fn(int(signal.SIGBUS), _bus_handler)


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
