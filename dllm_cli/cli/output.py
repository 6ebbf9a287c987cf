"""The only printer: answers go to stdout, everything else (logs, progress, live view) to stderr.

A failed write to stdout becomes a typed error at once: ``StdoutClosed`` when the reader went away
(``dllm run | head -c 1`` ends quietly), ``OutputError`` otherwise (``--json > /dev/full``).
"""
from __future__ import annotations

import errno
import json
import os
import sys
from typing import Any

from rich.console import Console

from dllm_cli.errors import OutputError, StdoutClosed
from dllm_cli.outfiles import describe

err = Console(stderr=True, highlight=False, soft_wrap=True)
out = Console(highlight=False)  # stdout; only for rendered answers (chat's Markdown), plain when not a TTY
MAX_MESSAGE = 600  # characters of one error line (user text inside is clipped before; this is the last guard)


def _stdout_failed(e: OSError) -> OutputError:
    silence_stdout()  # what is still buffered can never be written: do not fail again at exit
    if e.errno in (errno.EPIPE, errno.ECONNRESET) or isinstance(e, BrokenPipeError):
        return StdoutClosed("stdout was closed by its reader")
    return OutputError(f"cannot write to stdout: {describe(e)}", "check where stdout is redirected")


def silence_stdout() -> None:
    """Point fd 1 at /dev/null, so the interpreter's final flush cannot fail (and print) either."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass


def _write(text: str) -> None:
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except OSError as e:
        raise _stdout_failed(e) from None


def answer(text: str, end: str = "\n") -> None:
    """Write answer text to stdout (never styled)."""
    _write(text + end)


def rendered(renderable: Any) -> None:
    """Print a Rich renderable (a Markdown answer) on stdout."""
    try:
        out.print(renderable)
    except OSError as e:
        raise _stdout_failed(e) from None


def document(obj: Any) -> None:
    """Print exactly one JSON document on stdout."""
    _write(json.dumps(obj, ensure_ascii=False, indent=1) + "\n")


def info(msg: str) -> None:
    err.print(msg)


def warn(msg: str) -> None:
    err.print(f"[yellow]warning:[/] {msg}")


def one_line(msg: str, limit: int = MAX_MESSAGE) -> str:
    """``msg`` on one line, at most ``limit`` characters (the middle goes, so the hint at the end stays)."""
    flat = " ".join(msg.split())
    if len(flat) <= limit:
        return flat
    keep = (limit - 5) // 2
    return flat[:keep] + " ... " + flat[-keep:]


def error(msg: str) -> None:
    """One line on stderr; a closed or broken stderr is not a second error."""
    try:
        err.print(f"[bold red]error:[/] {msg}", markup=True, highlight=False)
    except OSError:
        pass
