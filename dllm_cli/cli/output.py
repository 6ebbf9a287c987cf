"""The only printer: answers go to stdout, everything else (logs, progress, live view) to stderr.

A failed write to stdout becomes a typed error at once: ``StdoutClosed`` when the reader went away
(``dllm run | head -c 1`` ends quietly), ``OutputError`` otherwise (``--json > /dev/full``).
"""
from __future__ import annotations

import errno
import json
import os
import sys
from typing import Any, Iterable

from rich.console import Console
from rich.segment import Segment

from dllm_cli import signals
from dllm_cli.errors import OutputError, StdoutClosed
from dllm_cli.outfiles import describe
from dllm_cli.printable import is_printable, printable



class SafeConsole(Console):
    """A Rich console that draws every piece of text through ``printable``: an ESC, BEL or C1 control inside a
    token, a trace, a file name or a message is shown (``␛``), never obeyed. Rich's own escape sequences
    (styles, and the live view's cursor moves, which are control segments) are untouched."""

    def _render_buffer(self, buffer: Iterable[Segment]) -> str:
        return super()._render_buffer(
            seg if seg.control or is_printable(seg.text) else Segment(printable(seg.text), seg.style, seg.control)
            for seg in buffer)


err = SafeConsole(stderr=True, highlight=False, soft_wrap=True)
out = SafeConsole(highlight=False)  # stdout; only for rendered answers (chat's Markdown), plain when not a TTY
MAX_MESSAGE = 600  # characters of one error line (user text inside is clipped before; this is the last guard)


def _stdout_failed(e: OSError) -> OutputError:
    silence_stdout()  # what is still buffered can never be written: do not fail again at exit
    signals.on_write_error(e)  # stdout was the terminal, and it hung up: that is a SIGHUP, not a write error
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


class QuietStream:
    """stderr that never fails the command: diagnostics written to a closed, full or hung-up stderr are lost,
    the work goes on (and the exit code still tells what happened)."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except OSError as e:
            signals.on_write_error(e)  # the terminal hung up: that is a SIGHUP
            return len(text)
        except ValueError:
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except OSError as e:
            signals.on_write_error(e)
        except ValueError:
            pass

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def text_streams() -> None:
    """Set up the standard streams for text in any locale (before anything is read or written).

    stdin is read as UTF-8 whatever the locale says, undecodable bytes kept as surrogates (each input then
    replaces them with a warning, ``dllm_cli.text``); stdout replaces what its encoding cannot represent (an
    ASCII-only stdout, ``PYTHONIOENCODING=ascii``, gets ``?`` instead of a crash; ``--json`` escapes instead).
    """
    for stream, kwargs in ((sys.stdin, {"encoding": "utf-8", "errors": "surrogateescape"}),
                           (sys.stdout, {"errors": "replace"}), (sys.stderr, {"errors": "backslashreplace"})):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is None:
            continue
        try:
            reconfigure(**kwargs)
        except (ValueError, OSError, LookupError, AttributeError):  # already read from, or not a text stream
            pass


def ascii_stdout() -> bool:
    """True when stdout cannot encode all of Unicode (``--json`` then escapes non-ASCII characters)."""
    encoding = (getattr(sys.stdout, "encoding", None) or "utf-8").lower().replace("-", "").replace("_", "")
    return encoding not in ("utf8", "utf16", "utf32", "utf8sig")


class GuardedStdout(QuietStream):
    """stdout whose failed writes raise dllm's typed errors (``StdoutClosed`` for a reader that went away, else
    ``OutputError``) instead of OSError, which click/Typer would turn into exit 1 (``dllm --help | head -c 1``)."""

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except OSError as e:
            raise _stdout_failed(e) from None

    def flush(self) -> None:
        try:
            self._stream.flush()
        except OSError as e:
            raise _stdout_failed(e) from None


def guard_stdout() -> None:
    """Install ``GuardedStdout`` on ``sys.stdout`` (once)."""
    if sys.stdout is not None and not isinstance(sys.stdout, GuardedStdout):
        sys.stdout = GuardedStdout(sys.stdout)  # type: ignore[assignment]


def shown(text: str) -> str:
    """Answer text for stdout: made printable when stdout is a terminal (it is drawn for a person), byte-exact
    when it is a pipe or a file (it is data)."""
    return printable(text) if out.is_terminal else text


def quiet_stderr() -> None:
    """Install ``QuietStream`` on ``sys.stderr`` (once); a closed stderr (``2>&-``) becomes /dev/null."""
    if sys.stderr is None:
        sys.stderr = open(os.devnull, "w")
    elif not isinstance(sys.stderr, QuietStream):
        sys.stderr = QuietStream(sys.stderr)  # type: ignore[assignment]


def _closed() -> OutputError:
    return OutputError("cannot write to stdout: it is closed", "do not close stdout (>&-); redirect it to a file")


_STREAM_ERRNOS = {errno.EPIPE, errno.ECONNRESET, errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO}


def stdout_broken(e: OSError) -> OutputError | None:
    """After an OSError from a write outside this module (click's --help): the stdout error it stands for, or
    None. Only stream errors without a file name qualify (file writes name their file)."""
    if sys.stdout is None:
        return _closed()
    try:
        sys.stdout.flush()
    except OSError as again:
        return _stdout_failed(again)
    return _stdout_failed(e) if e.errno in _STREAM_ERRNOS and not e.filename else None


def _write(text: str) -> None:
    if sys.stdout is None:
        raise _closed()
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
    if sys.stdout is None:
        raise _closed()
    try:
        out.print(renderable)
    except OSError as e:
        raise _stdout_failed(e) from None


def document(obj: Any) -> None:
    """Print exactly one JSON document on stdout."""
    _write(json.dumps(obj, ensure_ascii=ascii_stdout(), indent=1) + "\n")


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
