"""Terminal safety (issue 24, class 5): text from model or file data (token texts, trace pieces, a trace's
mode, answers, file names in messages) is drawn made printable (``dllm_cli/printable.py``): an ESC, BEL, CR, DEL
or C1 control is shown as a stand-in, never sent raw to the terminal. Data outputs (a piped answer) stay exact."""
from __future__ import annotations

import io
import json
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dllm_cli.cli import live as L
from dllm_cli.cli import output
from dllm_cli.decoding.events import StartEvent, StepEvent
from dllm_cli.printable import is_printable, printable

DLLM = str(Path(sys.executable).with_name("dllm"))
# Held-out style: several kinds of control sequences, as a hostile GGUF or trace would carry them.
HOSTILE = {
    "title": "\x1b]0;pwned\x07",            # OSC 0: retitles the window (the reported case)
    "clipboard": "\x1b]52;c;cHduZWQ=\x1b\\",  # OSC 52: writes the clipboard
    "clear": "\x1b[2J\x1b[H",               # CSI: clears the screen
    "c1csi": "\x9b31m",                      # C1 CSI (U+009B)
    "c1osc": "\x9d0;t\x9c",                  # C1 OSC ... ST
    "bell": "a\x07b",
    "overwrite": "ok\rXX\x08\x08",           # CR and BS overwrite what was drawn
    "del-nul": "x\x7fy\x00z",
}
RAW = ("\x1b]", "\x07", "\x9b", "\x9d", "\x9c", "\x1b[2J", "\x1b\\", "\r", "\x08", "\x7f", "\x00")


def controls(text: str) -> list[str]:
    return [ch for ch in text if ord(ch) < 0x20 and ch not in "\n\t" or 0x7F <= ord(ch) < 0xA0]


@pytest.mark.parametrize("name", HOSTILE)
def test_printable_leaves_no_control_character(name):
    text = "before " + HOSTILE[name] + " after\n\tnext"
    shown = printable(text)
    assert controls(shown) == [] and shown.endswith(" after\n\tnext") and is_printable(shown)
    one = printable(text, lines=False)
    assert "\n" not in one and "\t" not in one and controls(one) == []
    if "\x1b" in text:
        assert "␛" in shown  # visible, not dropped: a reader sees that something was there


def test_printable_keeps_ordinary_text_exact():
    text = "Grüße, 世界 — ½ ✓ emoji 🙂\n\ttab"
    assert printable(text) == text and is_printable(text)


def test_the_consoles_draw_data_text_printable_and_keep_their_own_styles():
    buf = io.StringIO()
    con = output.SafeConsole(file=buf, force_terminal=True, color_system="truecolor", width=200, highlight=False)
    con.print("[bold]name:[/] " + HOSTILE["title"] + HOSTILE["c1csi"], markup=True)
    drawn = buf.getvalue()
    assert "\x1b[1m" in drawn  # Rich's own style sequence is still there
    assert not any(raw in drawn for raw in ("\x1b]", "\x07", "\x9b")), repr(drawn)
    assert "␛]0;pwned" in drawn  # (Rich itself drops the BEL)


def hostile_events() -> tuple[list, dict[int, str]]:
    pieces = {i: t for i, t in enumerate(HOSTILE.values())}
    start = StartEvent(prompt_tokens=0, reused=0, block_length=8, mask_id=99, first_block=0, n_blocks=1,
                       config={"mode": "speed\x1b]0;mode\x07"})
    canvas = tuple(list(pieces)[:7]) + (99,)
    step = StepEvent(block=0, step=0, start=0, canvas=canvas, unmasked=tuple(range(7)), edited=((0, 7, 0),),
                     probs=(0.5,) * 8, forwards=1, commits=0, mask_count=1, elapsed_s=0.1)
    return [start, step], pieces


def test_the_live_view_draws_hostile_token_texts_printable():
    events, pieces = hostile_events()
    view = L.LiveView(pieces.get).feed(events)
    buf = io.StringIO()
    output.SafeConsole(file=buf, force_terminal=True, color_system="truecolor", width=300, height=20).print(view)
    drawn = buf.getvalue()
    for raw in RAW:
        assert raw not in drawn, (raw, drawn)
    assert "␛" in drawn and "pwned" in drawn  # shown, not hidden
    # the cells themselves, without any console
    assert all(is_printable(L.visible(p), lines=False) for p in pieces.values())


def pty_run(args: list[str], timeout: float = 120) -> tuple[int, bytes]:
    """Run dllm with stdout and stderr on a terminal (a pty, 120x40); everything it drew, and its exit code."""
    master, slave = pty.openpty()
    import fcntl
    import struct
    import termios

    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    p = subprocess.Popen([DLLM, *args], stdin=subprocess.DEVNULL, stdout=slave, stderr=slave)
    os.close(slave)
    data = bytearray()
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        ready, _, _ = select.select([master], [], [], 0.1)
        if ready:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the child closed its side
                break
            if not chunk:
                break
            data += chunk
        elif p.poll() is not None:
            break
    os.close(master)
    return p.wait(timeout=30), bytes(data)


@pytest.fixture
def hostile_trace(tmp_path) -> Path:
    """A real trace of the demo model with controls planted in every piece, the block text and the mode."""
    trace = tmp_path / "t.jsonl"
    r = subprocess.run([DLLM, "run", "Sort: 5 2 9", "--trace", str(trace)], capture_output=True, timeout=300)
    if r.returncode != 0:
        pytest.skip(f"dllm run failed: {r.stderr.decode()[-300:]}")
    evil = list(HOSTILE.values())
    lines = []
    for n, line in enumerate(trace.read_text().splitlines()):
        d = json.loads(line)
        if d["event"] == "start":
            d["config"]["mode"] = "quality" + HOSTILE["title"]
        for i, k in enumerate(sorted(d.get("pieces", {}))):
            d["pieces"][k] = d["pieces"][k] + evil[(i + n) % len(evil)]
        if d["event"] in ("block", "done"):
            d["text"] = d["text"] + HOSTILE["title"] + HOSTILE["clear"] + HOSTILE["c1csi"] + " end"
        lines.append(json.dumps(d))
    trace.write_text("\n".join(lines) + "\n")
    return trace


def test_a_replayed_hostile_trace_never_reaches_the_terminal_raw(hostile_trace):
    """The reported case: a replayed trace retitled the window. Live view, Markdown answer, stats line."""
    code, drawn = pty_run(["chat", "--replay", str(hostile_trace), "--speed", "0"])
    text = drawn.decode("utf-8", errors="replace")
    assert code == 0, text[-500:]
    for raw in ("\x1b]", "\x07", "\x1b[2J", "\u009b", "\x1b\\"):
        assert raw not in text, (raw, text[-800:])
    assert "␛]0;pwned␇" in text and " end" in text  # the answer is there, its controls visible


def test_a_replayed_hostile_trace_piped_keeps_the_answer_exact(hostile_trace):
    """stdout is data when it is a pipe: the answer's text as the trace has it, byte for byte."""
    r = subprocess.run([DLLM, "chat", "--replay", str(hostile_trace), "--speed", "0"], capture_output=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert (HOSTILE["title"] + HOSTILE["clear"] + HOSTILE["c1csi"] + " end").encode() in r.stdout


@pytest.mark.parametrize("name", ["title", "clear", "c1csi"])
def test_error_lines_that_echo_file_names_are_printable(tmp_path, name):
    """A message naming a file (here a trace that does not exist, named with controls) on a terminal."""
    path = tmp_path / ("trace" + HOSTILE[name] + ".jsonl")
    code, drawn = pty_run(["chat", "--replay", str(path)], timeout=60)
    text = drawn.decode("utf-8", errors="replace")
    assert code == 2, text
    assert "cannot read trace" in text
    assert not any(raw in text for raw in ("\x1b]", "\x07", "\x1b[2J", "\u009b")), repr(text)
