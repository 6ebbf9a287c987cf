"""SIGTERM and SIGHUP end dllm the way Ctrl-C does: the exception unwinds through the same cleanup (partial
``.part`` files removed, the KV cache and the terminal restored), then the process exits 143 / 129.

``install()`` runs once, in ``cli/app.main``. The handler raises ``Terminated`` (a ``KeyboardInterrupt``, so
every cleanup path written for Ctrl-C runs); a later TERM/HUP while that cleanup runs is ignored.

A signal that arrives while llama.cpp runs is handled by Python when the C call returns, unless llama.cpp
calls back into Python first (its log callback, bench's eval callback): an exception raised there is
swallowed by ctypes ("Exception ignored on calling ctypes callback function"). ``_unraisable`` catches that
case and sends the signal again a moment later, so it takes effect once control is back in Python. Ctrl-C gets
the same treatment (``_int_handler`` is Python's default behaviour plus that one exception).
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
from types import FrameType
from typing import Any

EXIT_NAMES = {signal.SIGINT: "interrupted", signal.SIGTERM: "terminated"}
if hasattr(signal, "SIGHUP"):
    EXIT_NAMES[signal.SIGHUP] = "hangup"
_HANDLED = tuple(s for s in EXIT_NAMES if s != signal.SIGINT)  # Python already raises KeyboardInterrupt on INT

RESEND_S = 0.05
received: int | None = None  # the TERM/HUP being handled, if any
_installed = False
_previous_hook: Any = None


class Terminated(KeyboardInterrupt):
    """Raised by the SIGTERM/SIGHUP handler; ``signum`` says which."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(signal.Signals(signum).name)


def _in_hook(frame: FrameType | None) -> bool:
    """True while ``_unraisable`` runs: an exception raised there would be swallowed once more."""
    while frame is not None:
        if frame.f_code is _unraisable.__code__:
            return True
        frame = frame.f_back
    return False


def _handler(signum: int, frame: FrameType | None) -> None:
    global received
    if _in_hook(frame):
        _resend(signum)  # not inside the hook: it would be swallowed again
        return
    if received is not None:
        return  # cleanup of the first one is under way: let it finish
    received = signum
    raise Terminated(signum)


def _int_handler(signum: int, frame: FrameType | None) -> None:
    """Python's own Ctrl-C behaviour (raise KeyboardInterrupt), except inside ``_unraisable``."""
    if _in_hook(frame):
        _resend(signum)
        return
    raise KeyboardInterrupt


def _resend(signum: int) -> None:
    """Send ``signum`` to this process again a moment from now (from a helper thread), by when the C call that
    swallowed it has usually returned; if it lands in a callback again, the cycle repeats."""
    def later() -> None:
        time.sleep(RESEND_S)
        os.kill(os.getpid(), signum)

    threading.Thread(target=later, name="dllm-signal-resend", daemon=True).start()


def _unraisable(hook_args: Any) -> None:
    """An interrupt raised inside a ctypes callback was swallowed: deliver it again once the callback is done
    (each later callback during the same C call may swallow it again; the C call still returns, and then it
    is raised in ordinary Python code)."""
    global received
    exc = hook_args.exc_value
    if isinstance(exc, KeyboardInterrupt):
        signum = exc.signum if isinstance(exc, Terminated) else signal.SIGINT
        if isinstance(exc, Terminated):
            received = None  # not delivered yet
        _resend(signum)
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
    try:
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            signal.signal(signal.SIGINT, _int_handler)
    except (ValueError, OSError):
        pass
    _previous_hook = sys.unraisablehook
    sys.unraisablehook = _unraisable


def exit_code(default: int = 130) -> int:
    """128 + the signal being handled (143 TERM, 129 HUP), else ``default`` (130, Ctrl-C)."""
    return 128 + received if received is not None else default


def exit_message() -> str:
    return EXIT_NAMES.get(signal.Signals(received), "interrupted") if received is not None else "interrupted"
