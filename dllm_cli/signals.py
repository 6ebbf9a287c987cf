"""SIGINT, SIGTERM and SIGHUP end dllm one way: the exception unwinds through the same cleanup (partial ``.part``
files removed, the decoder thread stopped, the KV cache and the terminal restored), then the process exits
130 / 143 / 129 with one line on stderr.

``install()`` runs first thing in the entry point (``cli/entry.py``, before the heavy imports). The handlers raise
``KeyboardInterrupt`` (Ctrl-C) or ``Terminated`` (a ``KeyboardInterrupt`` too, so every cleanup written for
Ctrl-C runs). When several signals arrive, the first TERM/HUP decides the exit code; a Ctrl-C gives 130 only when
no TERM/HUP came, and once a TERM/HUP is being handled later signals are ignored.

A handler that raises can break any Python statement in the main thread, including a cleanup half done (in
CPython 3.11 a ``Thread.join`` interrupted by Ctrl-C even marks a running thread as finished). Code that must not
be cut short runs inside ``deferred()``: there a signal is only recorded (and ``wake`` callbacks run, so a waiting
loop can notice it at once), and it is raised when the block ends. ``closing()`` marks the final exit, after which
signals are recorded and never raised.

A signal that arrives while llama.cpp runs is handled by Python when the C call returns, unless llama.cpp calls
back into Python first (its log callback, bench's eval callback): an exception raised there is swallowed by
ctypes ("Exception ignored on calling ctypes callback function"). ``_unraisable`` catches that case and sends the
signal again a moment later, so it takes effect once control is back in Python.

A terminal that hangs up makes reads, writes and ``termios`` calls on it fail with EIO, sometimes before the
kernel's SIGHUP has been delivered: ``is_hangup`` recognises that error and ``hangup()`` turns it into the SIGHUP
it stands for.
"""
from __future__ import annotations

import errno
import os
import signal
import sys
import threading
import time
TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (mypy reads the name)

if TYPE_CHECKING:  # not imported at run time: this module loads before anything else (cli/entry.py)
    from types import FrameType, TracebackType
    from typing import Any, Callable

EXIT_NAMES = {signal.SIGINT: "interrupted", signal.SIGTERM: "terminated"}
if hasattr(signal, "SIGHUP"):
    EXIT_NAMES[signal.SIGHUP] = "hangup"
_HANDLED = tuple(s for s in EXIT_NAMES if s != signal.SIGINT)  # Python already raises KeyboardInterrupt on INT

RESEND_S = 0.05
received: int | None = None  # the TERM/HUP being handled, if any
_swallowed: int | None = None  # the first TERM/HUP, when a ctypes callback swallowed its exception
interrupts = 0  # Ctrl-C presses so far (chat: a second one while the first is handled ends the session)
_installed = False
_owned = False  # install(owns_process=True): the dllm entry point, the process ends with dllm
_previous_hook: Any = None
_depth = 0  # nesting of deferred() blocks (main thread only)
_recorded: list[int] = []  # signals that arrived inside deferred()
_wakers: list[Callable[[], None]] = []
_closing = False
_silenced: dict[int, Any] = {}  # handlers closing() replaced with SIG_IGN
_wakeup_r: int | None = None  # read end of the signal wakeup pipe (``_drain``)
_woken = threading.Event()  # set when a signal is recorded: ends a nap()
_ttys: set[int] = set()  # standard fds that were terminals at start
_held = False  # hold_native() was called
_native: list["NativeThread"] = []  # threads that may be inside C code: exit hard while one is alive


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


def _record(signum: int) -> None:
    _recorded.append(signum)
    _woken.set()
    for wake in list(_wakers):
        try:
            wake()
        except Exception:  # noqa: BLE001 - a waker must never turn a signal into an error
            pass


def _drain() -> list[int]:
    """The signals delivered since the last call, in delivery order, from Python's wakeup fd (a byte per
    delivery; ``_count_deliveries``). Python runs the handlers of signals that arrived during one C call (a
    forward) once each and in signal-number order (HUP before INT before TERM), so only these bytes tell how
    many came and which came first."""
    global _wakeup_r
    if _wakeup_r is None:
        return []
    new: list[int] = []
    try:
        while chunk := os.read(_wakeup_r, 512):
            new.extend(chunk)
    except BlockingIOError:
        pass
    except OSError:
        _wakeup_r = None
    return new


def _terminate(signum: int) -> None:
    """A TERM/HUP: the first one decides (raised, or recorded inside ``deferred()``); later ones are ignored."""
    global received
    if received is not None or _closing:
        return  # the first TERM/HUP decides; its cleanup (or the exit) is under way: let it finish
    signum = _swallowed or signum  # one a ctypes callback swallowed came first (``_unraisable``)
    if _depth:
        _record(signum)
        return
    received = signum
    raise Terminated(signum)


def _handler(signum: int, frame: FrameType | None) -> None:
    if _in_hook(frame):
        _resend(signum)  # not inside the hook: it would be swallowed again
        return
    _terminate(next((s for s in _drain() if s in _HANDLED), signum))


def _int_handler(signum: int, frame: FrameType | None) -> None:
    """Ctrl-C: raise KeyboardInterrupt, like Python's own handler, except inside ``_unraisable`` (resent), inside
    ``deferred()`` (recorded) and while a TERM/HUP or the final exit is being handled (ignored). A TERM/HUP
    delivered together with it (the same C call) outranks it."""
    global interrupts
    if _in_hook(frame):
        _resend(signum)
        return
    new = _drain()
    interrupts += max(new.count(signal.SIGINT), 1)
    term = next((s for s in new if s in _HANDLED), None)
    if term is not None:
        _terminate(term)
        return
    if received is not None or _closing:
        return
    if _depth:
        _record(signum)
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
    global received, interrupts, _swallowed
    exc = hook_args.exc_value
    if isinstance(exc, KeyboardInterrupt):
        signum = exc.signum if isinstance(exc, Terminated) else signal.SIGINT
        if isinstance(exc, Terminated):
            received = None  # not delivered yet
            _swallowed = _swallowed or signum  # but it came first: a TERM/HUP meanwhile does not overtake it
        else:
            interrupts -= 1  # counted again when it is resent
        _resend(signum)
        return
    (_previous_hook or sys.__unraisablehook__)(hook_args)


def install(*, owns_process: bool = False) -> None:
    """Handle TERM and HUP like INT (idempotent). Signals the parent set to "ignore" (nohup) stay ignored.

    ``owns_process``: the caller is the ``dllm`` entry point, and the process ends when dllm does, so
    ``closing()`` may ignore signals at the OS level (never in a process that goes on, such as a test's)."""
    global _installed, _previous_hook, _closing, _owned
    _owned = _owned or owns_process
    if _installed:  # again (in-process callers of cli.app.main, tests): re-arm what closing() silenced
        _closing = False
        for sig, handler in list(_silenced.items()):
            try:
                if signal.getsignal(sig) == signal.SIG_IGN:
                    signal.signal(sig, handler)
            except (ValueError, OSError):
                pass
        _silenced.clear()
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
            _count_deliveries()
    except (ValueError, OSError):
        pass
    _previous_hook = sys.unraisablehook
    sys.unraisablehook = _unraisable
    for fd in (0, 1, 2):
        try:
            if os.isatty(fd):
                _ttys.add(fd)
        except OSError:
            pass


def _count_deliveries() -> None:
    """Point Python's signal wakeup fd at a pipe of ours (``_drain`` reads it), unless someone set one."""
    global _wakeup_r
    r, w = os.pipe()
    os.set_blocking(r, False)
    os.set_blocking(w, False)
    previous = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
    if previous != -1:  # taken (an event loop): put it back, count handler calls instead
        signal.set_wakeup_fd(previous)
        os.close(r)
        os.close(w)
        return
    _wakeup_r = r


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


class deferred:
    """``with deferred(wake=f):`` signals that arrive inside are recorded (``f()`` is called at once, from the
    handler: it must only set an event or put to a ``SimpleQueue``), then raised when the outermost block ends:
    ``Terminated`` for a TERM/HUP, else ``KeyboardInterrupt``. An exception already leaving the block is
    replaced (chained) only by a signal that outranks it. Outside the main thread it does nothing (signals are
    only ever handled there)."""

    def __init__(self, wake: Callable[[], None] | None = None) -> None:
        self.wake = wake
        self.active = False

    def __enter__(self) -> "deferred":
        global _depth
        if _main_thread():
            self.active = True
            _depth += 1
            if self.wake is not None:
                _wakers.append(self.wake)
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        global _depth, received
        if not self.active:
            return
        if self.wake is not None:
            _wakers.remove(self.wake)
        _depth -= 1
        if _depth or not _recorded:
            return
        sigs = list(_recorded)
        _recorded.clear()
        _woken.clear()
        term = next((s for s in sigs if s != signal.SIGINT), None)
        if term is not None and received is None and not _closing:
            received = term
            raise Terminated(term) from exc
        if exc is None and received is None and not _closing:
            raise KeyboardInterrupt  # a Ctrl-C; any exception already leaving the block carries the news anyway


def pending() -> bool:
    """Has a signal been recorded by ``deferred()`` and not raised yet (the caller should wind down)?"""
    return bool(_recorded)


def nap(seconds: float) -> None:
    """``time.sleep`` that a signal ends at once, also inside ``deferred()`` (where the handler only records it
    and a plain sleep would run to its end)."""
    if seconds > 0 and not _recorded:
        _woken.wait(seconds)


def closing() -> None:
    """The process is exiting: from now on signals are ignored (the exit code is already decided), also by
    the OS: at interpreter shutdown Python puts the default actions back, and a late SIGTERM would then kill
    the process by the signal instead of letting it exit with its code."""
    global _closing
    if not _owned:  # an in-process caller (a test): its process lives on, signals stay its own, and its
        return      # children must not inherit SIG_IGN (install() leaves ignored signals ignored, as for nohup)
    _closing = True
    if _main_thread():
        for s in EXIT_NAMES:
            try:
                handler = signal.getsignal(s)
                if handler in (_handler, _int_handler):
                    signal.signal(s, signal.SIG_IGN)
                    _silenced[s] = handler
            except (ValueError, OSError):
                pass


class NativeThread(threading.Thread):
    """A daemon thread that may be inside llama.cpp or ggml when the process exits (rpc-server's worker, chat's
    decoder). While one has not finished, ``cli/app`` ends the process with ``os._exit``: C++ static
    destructors at a normal exit would free what it still uses (a segfault at exit).

    ``finished`` is set when its target returns or raises. Use it (``wait_finished``), not ``is_alive()`` or
    ``join()``: in CPython 3.11 a ``join`` interrupted by Ctrl-C marks a thread that is still running as
    stopped (the ``bpo-45274`` cleanup in ``Thread._wait_for_tstate_lock``).
    """

    def __init__(self, target: Callable[[], None], name: str) -> None:
        super().__init__(target=target, name=name, daemon=True)
        self.finished = threading.Event()
        _native[:] = [t for t in _native if not t.finished.is_set()]
        _native.append(self)

    def run(self) -> None:
        try:
            super().run()
        finally:
            self.finished.set()

    def wait_finished(self, poll_s: float = 0.1) -> None:
        """Wait until the target has ended, whatever signals arrive meanwhile (they are deferred, then
        raised)."""
        with deferred():
            while not self.finished.wait(poll_s):
                pass


def native_alive() -> bool:
    """Is a started ``NativeThread`` still running its target (or was ``hold_native`` called)?"""
    return _held or any(t.ident is not None and not t.finished.is_set() for t in _native)


def hold_native() -> None:
    """A thread that is not a ``NativeThread`` may still be inside C code: exit with ``os._exit`` too."""
    global _held
    _held = True


def raise_first(sigs: list[int]) -> None:
    """Raise what ``sigs`` (signals caught by someone else, in arrival order) mean by dllm's rule: the first
    TERM/HUP as ``Terminated``, else ``KeyboardInterrupt`` for a Ctrl-C; nothing for an empty list."""
    global received
    term = next((s for s in sigs if s != signal.SIGINT), None)
    if term is not None:
        if received is None:
            received = term
        raise Terminated(received)
    if sigs:
        raise KeyboardInterrupt


def is_hangup(e: BaseException) -> bool:
    """Is ``e`` the EIO of a terminal that hung up (a read, write or termios call on a standard fd that was a
    terminal at start)? ``termios.error`` is not an OSError but carries the errno first."""
    return _errno(e) in (errno.EIO, errno.ENXIO) and bool(_ttys) and not _terminal_alive()


def _errno(e: BaseException) -> int | None:
    if isinstance(e, OSError):
        return e.errno
    try:
        import termios
    except ImportError:
        return None
    if isinstance(e, termios.error) and e.args and isinstance(e.args[0], int):
        return int(e.args[0])
    return None


def _terminal_alive() -> bool:
    try:
        import termios
    except ImportError:
        return True
    for fd in _ttys:
        try:
            termios.tcgetattr(fd)
        except (termios.error, OSError):
            return False
    return True


def on_write_error(e: BaseException) -> None:
    """A write to a standard stream failed with ``e``: if it is the hangup EIO, handle it as SIGHUP (recorded
    inside ``deferred()``, raised outside); any other error, or one after the signal is handled, is left to
    the caller (stderr's writer drops it)."""
    if received is not None or _closing or not is_hangup(e):
        return
    _hung_up()


def check_terminal() -> None:
    """Has a terminal dllm started on hung up? Then handle it as the SIGHUP it stands for (recorded inside
    ``deferred()``, raised outside). Needed because the kernel sends SIGHUP only to the session leader (the
    shell), and a hung-up terminal stops looking like one: Rich then quietly stops drawing, and a read ends in
    EOF, so without this check the decoder would run on to ``--max-tokens`` and the chat exit 0. One
    ``tcgetattr`` per call."""
    if received is None and not _closing and _ttys and not _terminal_alive():
        _hung_up()


def _hung_up() -> None:
    if _depth:
        if signal.SIGHUP not in _recorded:
            _record(signal.SIGHUP)
        return
    raise hangup()


def hangup() -> Terminated:
    """The terminal is gone: handle it as the SIGHUP the kernel sends (returns the exception to raise)."""
    global received
    if received is None:
        received = signal.SIGHUP
    return Terminated(received)


def exit_code(default: int = 130) -> int:
    """128 + the signal being handled (143 TERM, 129 HUP), else ``default`` (130, Ctrl-C)."""
    return 128 + received if received is not None else default


def exit_message() -> str:
    return EXIT_NAMES.get(signal.Signals(received), "interrupted") if received is not None else "interrupted"
