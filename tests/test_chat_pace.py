"""Pacing of chat's live view (``cli/pace.py``, ``cli/screen.py``), without a model: each frame is held
``--view-pace`` ms on a fake clock, the decoder runs ahead in its thread and is never held back by the drawing,
Ctrl-C stops it and keeps what it decoded, ``/set view_pace`` and the option's domain."""
from __future__ import annotations

import io
import re
import threading
import time

import pytest
from rich.console import Console

from dllm_cli.cli import live as L
from dllm_cli.cli import pace as P
from dllm_cli.cli.chat_cmd import Repl, is_demo
from dllm_cli.cli.screen import Screen
from dllm_cli.decoding.events import BlockEvent, DoneEvent, StepEvent
from dllm_cli.errors import UsageError
from dllm_cli.registry import embedded_model_path
from test_chat import M, ScriptedChat, events, piece


class FakeClock:
    """A clock that only moves when someone sleeps on it; every sleep is recorded (seconds)."""

    def __init__(self) -> None:
        self.t = 100.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.t

    def sleep(self, s: float) -> None:
        self.sleeps.append(round(s, 9))
        self.t += s


# --- Pacer ------------------------------------------------------------------------------------
def test_pacer_holds_every_frame_for_the_pace_when_the_decoder_is_ahead():
    clock = FakeClock()
    pacer = P.Pacer(50, clock=clock, sleep=clock.sleep)
    drawn_at = []
    for _ in range(5):  # all five events arrived at once: the decoder is far ahead
        assert pacer.frame(arrived=100.0)
        drawn_at.append(round(clock.t - 100.0, 9))
    assert drawn_at == [0.0, 0.05, 0.1, 0.15, 0.2]
    assert clock.sleeps == [0.05] * 4


def test_pacer_adds_nothing_when_the_decoder_is_slower_than_the_pace():
    clock = FakeClock()
    pacer = P.Pacer(50, clock=clock, sleep=clock.sleep)
    for _ in range(4):
        assert pacer.frame(arrived=clock.t)  # drawn as it arrives
        clock.t += 0.2  # the next forward takes 200 ms
    assert clock.sleeps == []
    pacer.frame(arrived=clock.t)
    clock.t += 0.03  # a quick one after a slow one is held only the rest of the pace
    pacer.frame(arrived=clock.t)
    assert clock.sleeps == [pytest.approx(0.02)]


def test_pacer_catches_up_when_too_far_behind():
    clock = FakeClock()
    pacer = P.Pacer(100, max_lag_frames=3, clock=clock, sleep=clock.sleep)
    drawn = [pacer.frame(arrived=99.95) for _ in range(6)]
    # held while at most 3 frames (0.3 s) behind; beyond, frames are folded and drawn at most every FRAME_S
    assert drawn == [True, True, True, True, False, False] and clock.sleeps == [0.1] * 3
    clock.t += 1.5 * P.FRAME_S
    assert pacer.frame(arrived=99.95) and len(clock.sleeps) == 3


def test_default_pace_makes_a_ten_forward_answer_last_about_half_a_second():
    clock = FakeClock()
    pacer = P.Pacer(P.DEFAULT_PACE_MS, clock=clock, sleep=clock.sleep)
    for _ in range(11):  # the all-mask frame and ten forwards, decoded in 0.03 s
        pacer.frame(arrived=100.0)
    assert 0.4 <= sum(clock.sleeps) <= 0.6


# --- DecodeAhead / show_paced -------------------------------------------------------------------
def test_the_decoder_runs_to_the_end_while_the_view_is_still_holding_frames():
    """The drawing's sleeps wait for the decoder to finish: if decoding waited for the drawing (one thread, or
    a pace that throttles the producer), the first sleep would time out and the test fail."""
    decoded = threading.Event()
    produced: list[str] = []

    def decoder():
        for i in range(6):
            produced.append(threading.current_thread().name)
            yield i
        decoded.set()

    clock = FakeClock()

    def sleep(s: float) -> None:
        assert decoded.wait(10), "the decoder was held back by the view's pacing"
        clock.sleep(s)

    folded: list[int] = []
    draws: list[int] = []
    P.show_paced(decoder(), folded.append, lambda: len(folded), lambda: draws.append(folded[-1]),
                 P.Pacer(40, clock=clock, sleep=sleep))
    assert folded == draws == list(range(6)) and clock.sleeps == [0.04] * 5
    assert set(produced) == {"dllm-decode"}


def test_unchanged_pictures_are_not_held():
    clock = FakeClock()
    folded: list[int] = []
    draws: list[int] = []
    P.show_paced(iter([1, 1, 2, 2, 2, 3]), folded.append, lambda: folded[-1], lambda: draws.append(folded[-1]),
                 P.Pacer(40, clock=clock, sleep=clock.sleep))
    assert folded == [1, 1, 2, 2, 2, 3] and draws == [1, 2, 3] and clock.sleeps == [0.04, 0.04]


def test_an_error_of_the_decoder_is_raised_after_the_events_before_it():
    def decoder():
        yield 1
        yield 2
        raise UsageError("the context is full")

    folded: list[int] = []
    with pytest.raises(UsageError, match="context is full"):
        P.show_paced(decoder(), folded.append, lambda: len(folded), lambda: None, P.Pacer(0))
    assert folded == [1, 2]


def test_ctrl_c_stops_the_decoder_in_its_thread_and_keeps_every_event_it_made():
    closed_in: list[str] = []
    made: list[int] = []

    def decoder():  # endless: only the stop ends it
        try:
            while True:
                made.append(len(made))
                yield made[-1]
        except GeneratorExit:
            closed_in.append(threading.current_thread().name)
            raise

    clock = FakeClock()

    def sleep(s: float) -> None:
        if len(clock.sleeps) == 2:
            raise KeyboardInterrupt
        clock.sleep(s)

    folded: list[int] = []
    with pytest.raises(KeyboardInterrupt):
        P.show_paced(decoder(), folded.append, lambda: len(folded), lambda: None,
                     P.Pacer(50, clock=clock, sleep=sleep))
    assert closed_in == ["dllm-decode"]  # closed by the thread that ran it, before show_paced returned
    assert folded == made and len(made) >= 3


# --- the live view's pictures ---------------------------------------------------------------------
def test_picture_changes_with_every_drawn_step_and_not_with_counters():
    ev = events()
    view = L.LiveView(piece)
    pictures = []
    for e in ev:
        view.update(e)
        pictures.append(view.picture())
    assert len(set(pictures)) == len(ev)  # start, 3 steps, 2 blocks and done each draw something new
    step = ev[4]
    assert isinstance(step, StepEvent)
    same = view.picture()
    view.forwards += 1
    view.elapsed_s += 1.0
    assert view.picture() == same


# --- Screen ----------------------------------------------------------------------------------------
class Terminal:
    """stderr as a 100x20 terminal (the live view is drawn there), stdout captured; ``err()`` without styles."""

    def __init__(self, capsys) -> None:
        self.capsys = capsys
        self.stderr = io.StringIO()
        self.stdout = ""

    def err(self) -> str:
        return ANSI.sub("", self.stderr.getvalue())

    def out(self) -> str:
        self.stdout += self.capsys.readouterr().out
        return self.stdout


ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


@pytest.fixture
def terminal(monkeypatch, capsys) -> Terminal:
    from dllm_cli.cli import output

    term = Terminal(capsys)
    monkeypatch.setattr(output, "err", Console(file=term.stderr, force_terminal=True, width=100, height=20, soft_wrap=True))
    return term


def test_screen_holds_each_frame_and_prints_the_same_answer_and_stats(terminal):
    clock = FakeClock()
    screen = Screen(live=True, plain=True, piece=piece, pace_ms=50, clock=clock, sleep=clock.sleep)
    done = screen.show(iter(events()), "speed")
    assert isinstance(done, DoneEvent) and done.text == "Hello wor!ld"
    assert clock.sleeps == [0.05] * (len(events()) - 1)  # every event of the script draws a new picture
    assert terminal.out() == "Hello wor!ld\n"
    assert L.summary_line(done, "speed") in terminal.err()  # decode time 0.60 s, not the 0.3 s of drawing
    assert "0.60s" in terminal.err() and L.MASK_CELL in terminal.err()


def test_pace_0_draws_as_the_decoder_goes(terminal, monkeypatch):
    from dllm_cli.cli import screen as screen_mod

    paced = []
    monkeypatch.setattr(screen_mod, "show_paced", lambda *a, **k: paced.append(1))
    clock = FakeClock()
    screen = Screen(live=True, plain=True, piece=piece, pace_ms=0, clock=clock, sleep=clock.sleep)
    assert screen.show(iter(events()), "speed") is not None
    assert clock.sleeps == [] and paced == [] and terminal.out() == "Hello wor!ld\n"
    assert L.MASK_CELL not in terminal.err()  # unpaced, the 7 events come within one 1/30 s frame: one drawing


def test_ctrl_c_after_the_decoder_finished_shows_the_whole_answer(terminal):
    clock = FakeClock()
    finished = threading.Event()

    def decoder():
        yield from events()
        finished.set()

    def sleep(s: float) -> None:
        if clock.sleeps:  # the second hold: Ctrl-C, once the decoder is done
            assert finished.wait(10)
            raise KeyboardInterrupt
        clock.sleep(s)

    screen = Screen(live=True, plain=True, piece=piece, pace_ms=50, clock=clock, sleep=sleep)
    done = screen.show(decoder(), "speed")
    assert done is not None and terminal.out() == "Hello wor!ld\n" and "interrupted" not in terminal.err()
    assert "0.60s" in terminal.err()


class SlowChat(ScriptedChat):
    """A scripted chat whose decoder is busy with a long forward after the first block (half a second)."""

    def stream(self, ids):
        for ev in self.evs:
            if isinstance(ev, StepEvent) and ev.block == 2:
                time.sleep(0.5)
            yield ev


def test_ctrl_c_while_decoding_keeps_the_partial_answer_marked_interrupted(terminal):
    chat = SlowChat(events())
    clock = FakeClock()

    def sleep(s: float) -> None:
        if len(clock.sleeps) == 1:  # the view is at the first block, the decoder in its slow forward: Ctrl-C
            raise KeyboardInterrupt
        clock.sleep(s)

    screen = Screen(live=True, plain=True, piece=piece, pace_ms=50, clock=clock, sleep=sleep)
    Repl(chat, screen).turn(chat.ask("hi"))
    turn = chat.conversation.turns[-1]
    assert (turn.content, turn.interrupted) == ("Hello", True)
    assert terminal.out() == "Hello\n"  # what is printed is what the transcript keeps
    assert "interrupted" in terminal.err() and chat.loaded.session.rollbacks == [3]
    assert screen.view.done is None


def test_an_error_while_paced_leaves_the_session_usable(terminal):
    from dllm_cli.errors import ContextFullError

    chat = ScriptedChat(events(), fail_after=3, error=ContextFullError("the context is full (4100 > 4096 tokens)"))
    clock = FakeClock()
    repl = Repl(chat, Screen(live=True, plain=True, piece=piece, pace_ms=50, clock=clock, sleep=clock.sleep))
    repl.turn(chat.ask("hi"))
    assert "the context is full" in terminal.err() and "/clear" in terminal.err()
    assert chat.conversation.turns == [] and chat.loaded.session.rollbacks == [3]


# --- /set view_pace, the banner ----------------------------------------------------------------------
def test_set_view_pace_changes_the_screen_and_is_listed(capsys):
    chat = ScriptedChat(events())
    screen = Screen(live=False, plain=True, pace_ms=50)
    repl = Repl(chat, screen)
    repl.command("/set view_pace 120")
    assert screen.pace_ms == 120
    repl.command("/set view-pace 0")
    assert screen.pace_ms == 0
    for bad in ("-1", "5001", "fast", "1.5"):
        repl.command(f"/set view_pace {bad}")
        assert screen.pace_ms == 0
    repl.command("/set")
    repl.command("/set nope 1")
    repl.command("/help")
    err = capsys.readouterr().err
    assert "view_pace=120 ms" in err and "view_pace=0 ms" in err
    assert err.count("--view-pace must be an integer in [0, 5000]") == 2 and err.count("--view-pace takes an integer") == 2
    assert any(line.startswith("mode=speed, ") and line.endswith(", view_pace=0") for line in err.splitlines())
    assert "unknown setting 'nope'" in err and err.count("block_length, view_pace") >= 2


def test_only_the_embedded_demo_model_is_the_demo(tmp_path):
    assert is_demo(embedded_model_path())
    copy = tmp_path / "demo.gguf"
    copy.write_bytes(b"GGUF")
    assert not is_demo(copy) and not is_demo(tmp_path / "missing.gguf")


def test_banner_lists_three_example_prompts_for_the_demo_model_only(monkeypatch, capsys):
    from dllm_cli.cli import chat_cmd

    class Model:
        def __init__(self, path):
            self.path = path

    for path, shown in ((embedded_model_path(), True), (embedded_model_path().with_name("other.gguf"), False)):
        chat = ScriptedChat(events())
        chat.loaded.model = Model(path)
        repl = Repl(chat, Screen(live=False, plain=True))
        repl.interactive = True
        monkeypatch.setattr(repl, "_start_readline", lambda: None)
        monkeypatch.setattr(repl, "read", lambda: None)  # Ctrl-D at once
        repl.loop()
        err = capsys.readouterr().err
        assert "dllm chat · " in err
        for prompt, _why in chat_cmd.DEMO_PROMPTS:
            assert (f"  {prompt} " in err) is shown, err
    assert [p for p, _ in chat_cmd.DEMO_PROMPTS][2] == "/mode speed"


def test_block_events_fold_into_text_while_paced():
    """The view's text after a paced show is the decoder's whole text (nothing dropped between frames)."""
    clock = FakeClock()
    view = L.LiveView(piece)
    evs = events()
    P.show_paced(iter(evs), view.update, view.picture, lambda: None,
                 P.Pacer(50, max_lag_frames=1, clock=clock, sleep=clock.sleep))
    assert view.text == "".join(e.text for e in evs if isinstance(e, BlockEvent)) and view.done == evs[-1]


def test_levenshtein_steps_are_paced_like_any_other():
    """Pacing knows no event kinds: a LLaDA2.2 step that deletes and inserts changes the canvas, so it is a frame."""
    ev = events()
    lev = StepEvent(block=2, step=2, start=8, canvas=(3, 6, M, 4), unmasked=(), edited=(), probs=(0.9, 0.8),
                    forwards=5, commits=1, mask_count=1, elapsed_s=0.45, deleted=((1, 1, 4),), inserted=((2, 2),))
    clock = FakeClock()
    view = L.LiveView(piece)
    drawn: list[tuple] = []
    P.show_paced(iter([*ev[:5], lev, *ev[5:]]), view.update, view.picture, lambda: drawn.append(view.canvas),
                 P.Pacer(50, clock=clock, sleep=clock.sleep))
    assert (3, 6, M, 4) in drawn and len(clock.sleeps) == len(ev)
