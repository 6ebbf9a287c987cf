"""SIGTERM and SIGHUP end dllm the way Ctrl-C does: the exception unwinds through the same cleanup (partial
``.part`` files removed, the KV cache and the terminal restored), then the process exits 143 / 129.

``install()`` runs once, in ``cli/app.main``. The handler raises ``Terminated`` (a ``KeyboardInterrupt``, so
every cleanup path written for Ctrl-C runs); a later TERM/HUP while that cleanup runs is ignored.

A signal that arrives while llama.cpp runs is handled by Python when the C call returns, unless llama.cpp
calls back into Python first (its log callback, bench's eval callback): an exception raised there is
swallowed by ctypes ("Exception ignored on calling ctypes callback function"). ``_unraisable`` catches that
case and re-delivers the signal, so it takes effect as soon as control is back in Python.
"""
from __future__ import annotations

import _thread
import signal
import sys
from types import FrameType
from typing import Any

EXIT_NAMES = {signal.SIGINT: "interrupted", signal.SIGTERM: "terminated"}
if hasattr(signal, "SIGHUP"):
    EXIT_NAMES[signal.SIGHUP] = "hangup"
_HANDLED = tuple(s for s in EXIT_NAMES if s != signal.SIGINT)  # Python already raises KeyboardInterrupt on INT

received: int | None = None  # the TERM/HUP being handled, if any
_installed = False
_previous_hook: Any = None


class Terminated(KeyboardInterrupt):
    """Raised by the SIGTERM/SIGHUP handler; ``signum`` says which."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(signal.Signals(signum).name)


def _handler(signum: int, frame: FrameType | None) -> None:
    global received
    if received is not None:
        return  # cleanup of the first one is under way: let it finish
    received = signum
    raise Terminated(signum)


def _unraisable(hook_args: Any) -> None:
    """An interrupt raised inside a ctypes callback was swallowed: deliver it again, outside the callback."""
    global received
    exc = hook_args.exc_value
    if isinstance(exc, KeyboardInterrupt):
        signum = exc.signum if isinstance(exc, Terminated) else signal.SIGINT
        received = None
        _thread.interrupt_main(signum)  # the handler runs again at the next Python instruction
        return
    (_previous_hook or sys.__unraisablehook__)(hook_args)


def install() -> None:
    """Handle TERM and HUP like INT (idempotent). Signals the parent set to "ignore" (nohup) stay ignored."""
    global _installed, _previous_hook
    if _installed:
        return
    _installed = True
    for s in _HANDLED:
        try:
            if signal.getsignal(s) == signal.SIG_DFL:
                signal.signal(s, _handler)
        except (ValueError, OSError):  # not the main thread (embedded use): leave signals alone
            pass
    _previous_hook = sys.unraisablehook
    sys.unraisablehook = _unraisable


def exit_code(default: int = 130) -> int:
    """128 + the signal being handled (143 TERM, 129 HUP), else ``default`` (130, Ctrl-C)."""
    return 128 + received if received is not None else default


def exit_message() -> str:
    return EXIT_NAMES.get(signal.Signals(received), "interrupted") if received is not None else "interrupted"
