"""Pacing of chat's live view: each frame stays on screen at least ``--view-pace`` milliseconds, without slowing
the decoder down.

On the embedded demo model an answer takes a few hundredths of a second, less than one frame of a terminal: the
live view would be gone before anyone saw it. So the decoder runs ahead in a thread (``DecodeAhead``) and the view
replays its events at the pace (``Pacer``): the events, their order and their ``elapsed_s`` (decode time, what the
stats line reports) are exactly those of an unpaced answer; only the drawing is later. On a model slower than the
pace the view simply follows the decoder and nothing is added.

Nothing here knows the kinds of events: a *frame* is whatever changes ``LiveView.picture()``.
"""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable, Generic, Iterable, Iterator, TypeVar, cast

from dllm_cli import signals

T = TypeVar("T")

DEFAULT_PACE_MS = 50  # ~10 forwards of a demo answer watchable in ~0.5 s; ~20 frames/s still reads as motion
MAX_LAG_FRAMES = 40  # the view falls at most this many frames' time behind the decoder (2 s at the default pace)
FRAME_S = 1 / 30  # when the view is not holding frames it redraws at most this often


class Pacer:
    """When to draw the next frame: not before the frame on screen has been up ``pace_ms`` milliseconds.

    ``clock`` (seconds, monotonic) and ``sleep`` (seconds) are injectable so tests are exact. A frame whose event
    reached the view more than ``max_lag_frames`` × pace ago is not held: the view then catches up, redrawing at
    most every ``FRAME_S`` seconds, so a long answer on a fast model is not delayed by more than that lag.
    """

    def __init__(self, pace_ms: int, *, max_lag_frames: int = MAX_LAG_FRAMES,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> None:
        self.pace_s = max(pace_ms, 0) / 1000
        self.max_lag_s = max_lag_frames * self.pace_s
        self.clock = clock
        self.sleep = sleep
        self.shown_at: float | None = None  # clock time the frame on screen was drawn

    def frame(self, arrived: float) -> bool:
        """Call before drawing a new frame whose event arrived at clock time ``arrived`` (seconds).

        Sleeps until the frame on screen has been up ``pace``; True means draw the new frame now, False means the
        view is catching up and this frame is only folded into the view state, not drawn.
        """
        now = self.clock()
        if self.shown_at is not None:
            if now - arrived > self.max_lag_s:
                if now - self.shown_at < FRAME_S:
                    return False
            else:
                due = self.shown_at + self.pace_s
                if due > now:
                    self.sleep(due - now)
                    now = self.clock()
        self.shown_at = now
        return True


@dataclass(frozen=True)
class _Failed:
    error: BaseException


_END = object()
_WAKE = object()


class DecodeAhead(Generic[T]):
    """Pull ``events`` to the end in a thread, as fast as they come, and hand them on with their arrival time.

    Iterating yields ``(event, arrived)`` in order (``arrived`` on ``clock``, seconds); an exception raised by
    ``events`` is raised again by the iteration, after the events before it; the iteration also ends early when
    ``halt()`` turns true (checked whenever ``wake()`` is called, and every ``POLL_S``). ``stop()`` makes the
    thread stop at the next event and close ``events`` (its ``close()``, in the thread that ran it: a generator's
    cleanup, such as chat's recording of an interrupted answer, runs there), and waits for it whatever signals
    arrive meanwhile. Signals reach only the main thread, so the decoder itself never sees a KeyboardInterrupt.
    The thread is a ``signals.NativeThread``: it may be inside llama.cpp.
    """

    POLL_S = 0.1  # the consumer wakes this often while waiting

    def __init__(self, events: Iterable[T], *, clock: Callable[[], float] = time.monotonic,
                 halt: Callable[[], bool] | None = None) -> None:
        self._events = events
        self._clock = clock
        self._halt = halt
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._thread = signals.NativeThread(self._run, name="dllm-decode")
        self._thread.start()

    def _run(self) -> None:
        try:
            self._pull()
        finally:
            self._queue.put(_END)

    def _pull(self) -> None:
        events = iter(self._events)
        stopped = False
        try:
            for ev in events:
                self._queue.put((ev, self._clock()))
                if self._stop.is_set():
                    stopped = True
                    break
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, raised there
            self._queue.put(_Failed(e))
        if stopped:
            close = getattr(events, "close", None)
            try:
                if close is not None:
                    close()
            except BaseException as e:  # noqa: BLE001 - e.g. a cache repair that failed
                self._queue.put(_Failed(e))

    def wake(self) -> None:
        """Make a waiting iteration look at ``halt()`` now (safe from a signal handler: ``SimpleQueue.put`` is
        reentrant)."""
        self._queue.put(_WAKE)

    def __iter__(self) -> Iterator[tuple[T, float]]:
        while True:
            if self._halt is not None and self._halt():
                return
            try:
                item = self._queue.get(timeout=self.POLL_S)
            except queue.Empty:
                continue
            if item is _WAKE:
                continue
            if item is _END:
                return
            if isinstance(item, _Failed):
                raise item.error
            yield cast("tuple[T, float]", item)

    def stop(self) -> None:
        """Stop the decoder at its next event and wait for it (for the forward under way, at worst).

        Signals that arrive meanwhile are deferred and raised when it has ended (``NativeThread.wait_finished``:
        not ``Thread.join``, which CPython 3.11 lets a Ctrl-C end early): the events must be closed by their
        own thread before anyone else touches them or frees the model.
        """
        self._stop.set()
        self._thread.wait_finished()

    def rest(self) -> list[T]:
        """After ``stop()``: the events the decoder produced that were not iterated yet (errors dropped)."""
        out: list[T] = []
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return out
            if isinstance(item, tuple):
                out.append(item[0])


def show_paced(events: Iterable[T], fold: Callable[[T], None], picture: Callable[[], object],
               draw: Callable[[], None], pacer: Pacer) -> None:
    """Fold every event into the view (``fold``); draw (``draw``) each new ``picture()`` when ``pacer`` says so.

    The events are pulled by a ``DecodeAhead`` thread, so the pacer's sleeps never hold the decoder back. The
    whole show runs inside ``signals.deferred``: a signal ends the loop (at once: it wakes the wait), the decoder
    is stopped (its events closed in its own thread), every event it had produced is folded too, so the view
    holds what was decoded, as an unpaced view would; then the signal is raised (KeyboardInterrupt, or
    ``Terminated`` for a TERM/HUP, which wins). Any other exception also stops the decoder before it propagates.
    """
    ahead: DecodeAhead[T] | None = None

    def wake() -> None:
        if ahead is not None:
            ahead.wake()

    with signals.deferred(wake=wake):
        ahead = DecodeAhead(events, clock=pacer.clock, halt=signals.pending)
        drawn: object = None
        try:
            for ev, arrived in ahead:
                fold(ev)
                now = picture()
                if now != drawn and pacer.frame(arrived):
                    draw()
                    drawn = now
                if signals.pending():
                    break
        except KeyboardInterrupt:  # raised, not recorded: signals.install() was not called (embedded use)
            ahead.stop()
            for ev in ahead.rest():
                fold(ev)
            raise
        finally:
            ahead.stop()
        if signals.pending():
            for ev in ahead.rest():
                fold(ev)
