"""How one chat answer is shown: ``Screen`` draws the live view on stderr's terminal (paced, ``cli/pace.py``)
and prints the finished answer on stdout, or prints plain finalized text when there is no terminal."""
from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator

from rich.live import Live
from rich.markdown import Markdown
from rich.markup import escape

from dllm_cli.cli import output
from dllm_cli.cli.live import LiveView, summary_line
from dllm_cli.cli.pace import FRAME_S, Pacer, show_paced
from dllm_cli.decoding.events import BlockEvent, DoneEvent, Event, StepEvent
from dllm_cli import signals
from dllm_cli.signals import Terminated


@contextmanager
def keys_unechoed() -> Iterator[None]:
    """Keys typed while the live view is drawn are not echoed over it (they would scroll the terminal under the
    view and leave stale frames behind); they stay in the input buffer and readline shows them at the next prompt."""
    try:
        import termios
    except ImportError:  # Windows: no termios
        yield
        return
    try:
        fd = sys.stdin.fileno()
        saved = termios.tcgetattr(fd)
    except (termios.error, OSError, ValueError):  # stdin is not a terminal (or closed)
        yield
        return
    quiet = list(saved)
    quiet[3] &= ~termios.ECHO
    try:
        termios.tcsetattr(fd, termios.TCSANOW, quiet)
        changed = True
    except (termios.error, OSError):  # the terminal hung up meanwhile
        changed = False
    try:
        yield
    finally:
        if changed:
            try:
                termios.tcsetattr(fd, termios.TCSANOW, saved)
            except (termios.error, OSError):  # hung up: there is no terminal left to restore
                pass


class Screen:
    """How a turn is shown: the live view on stderr's terminal, or plain finalized text on stdout.

    ``pace_ms``: with the live view, each new frame stays on screen at least this many milliseconds (0: draw as
    the decoder goes, at most every ``FRAME_S`` seconds). ``clock``/``sleep`` (seconds) are the pacer's, for tests.
    """

    def __init__(self, *, live: bool, plain: bool, piece: Callable[[int], str] | None = None, pace_ms: int = 0,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = signals.nap) -> None:
        self.live = live
        self.plain = plain or not output.out.is_terminal
        self.view = LiveView(piece)
        self.pace_ms = pace_ms
        self.clock, self.sleep = clock, sleep

    def show(self, events: Iterable[Event], mode: str = "") -> DoneEvent | None:
        """Consume one answer's events; returns its DoneEvent (KeyboardInterrupt propagates)."""
        self.view.mode = mode
        self.view.reset()
        if not self.live:
            for ev in events:
                self.view.update(ev)
                if isinstance(ev, BlockEvent) and ev.text:
                    output.answer(output.shown(ev.text), end="")
            if self.view.text and not self.view.text.endswith("\n"):
                output.answer("")
            return self.view.done
        try:
            self._live(events)
        except KeyboardInterrupt as e:
            # the model had finished and only the view was behind: the answer is whole, show it as recorded
            if isinstance(e, Terminated) or self.view.done is None:
                raise
        self.finish()
        return self.view.done

    def _live(self, events: Iterable[Event]) -> None:
        """The live view, drawn while the events come. It runs inside ``signals.deferred``, so a signal never
        cuts a statement short here: it ends the loop, the decoder is stopped and its events closed, the
        terminal is restored (echo back on, the transient view erased, the cursor shown), and only then is the
        signal raised."""
        with signals.deferred(), keys_unechoed(), Live(self.view, console=output.err, auto_refresh=False,
                                                      transient=True, redirect_stdout=False,
                                                      redirect_stderr=False) as live:
            def draw() -> None:
                signals.check_terminal()  # a hung-up terminal is a SIGHUP (Rich would just stop drawing)
                live.refresh()

            if self.pace_ms:
                pacer = Pacer(self.pace_ms, clock=self.clock, sleep=self.sleep)
                show_paced(events, self.view.update, self.view.picture, draw, pacer)
                return
            last = 0.0
            for ev in events:
                self.view.update(ev)
                now = time.monotonic()
                if isinstance(ev, (StepEvent, BlockEvent)) and now - last >= FRAME_S:
                    draw()
                    last = now
                if signals.pending():
                    close = getattr(events, "close", None)
                    if close is not None:
                        close()  # the generator's cleanup (an interrupted answer recorded) runs here, whole
                    return

    def finish(self, interrupted: bool = False) -> None:
        """Print the answer for good (after the transient live view is gone) and its stats line."""
        if not self.live:
            if interrupted:
                if self.view.text and not self.view.text.endswith("\n"):
                    output.answer("")
                output.err.print("interrupted")
            return
        text = self.view.text
        if text.strip():
            if self.plain:
                output.answer(text.rstrip("\n"))
            else:
                output.rendered(Markdown(text))
        done = self.view.done
        if interrupted:
            output.err.print("[yellow]⏹ interrupted[/] [grey50](partial answer kept in the transcript)[/]")
        elif done is not None:
            if not text.strip():
                output.err.print("[grey50](empty answer)[/]")
            output.err.print(f"[grey50]{escape(summary_line(done, self.view.mode))}[/]")
