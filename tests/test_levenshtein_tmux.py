"""The chat live view of LLaDA2.2 edits in a real terminal (tmux): a scripted 2.2 decode (``levenshtein_story``)
replayed with ``dllm chat --replay``. A deleted token must appear struck out (SGR 9) while the row closes up, an
inserted slot as the magenta ``▓`` cell between its neighbours, and the final answer must be the edited text."""
from __future__ import annotations

import os
import re
import shlex
import shutil
import sys
import time
from pathlib import Path

import pytest

from dllm_cli.cli.live import INSERT_CELL
from levenshtein_story import write_story
from runtime_marks import needs_runtime
from test_chat_tmux import Pane

DLLM = Path(sys.executable).with_name("dllm")
pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")


def frames(pane: Pane, until: str, timeout: float = 60.0) -> list[str]:
    """Every distinct screen (with escapes) until ``until`` shows up."""
    seen: list[str] = []
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        text = pane.tmux("capture-pane", "-p", "-e", "-t", pane.name)
        if not seen or text != seen[-1]:
            seen.append(text)
        if until in pane.capture(history=True):
            return seen
        time.sleep(0.01)
    pytest.fail(f"timed out; last screen:\n{seen[-1] if seen else ''}")


def test_deletes_are_struck_out_and_inserts_open_a_slot(tmp_path):
    story = write_story(tmp_path / "story.jsonl", gap_s=0.6)
    cmd = " ".join(shlex.quote(a) for a in [str(DLLM), "chat", "--replay", str(story), "--plain"])
    env = {"TERM": "xterm-256color", "PYTHONUNBUFFERED": "1", "DLLM_HOME": str(tmp_path / "home"),
           **({"DLLM_RUNTIME_DIR": os.environ["DLLM_RUNTIME_DIR"]} if "DLLM_RUNTIME_DIR" in os.environ else {})}
    pane = Pane(cmd, env, tmp_path)
    try:
        shots = frames(pane, "EXIT=")
        final = pane.capture(history=True)
    finally:
        pane.close()
    assert "The big cat sat on the mat." in final and "EXIT=0" in final
    assert "1 ins · 1 del" in final
    struck = re.compile(r"\x1b\[(?:[0-9]+;)*9m(?:\x1b\[[0-9;]*m)* cat")  # SGR 9 (strike), possibly with bold: 1;9
    deleted = [s for s in shots if struck.search(s) and "step 2" in s]
    assert deleted, "no frame showed the deleted ' cat' struck out at step 2"
    inserted = [s for s in shots if INSERT_CELL in s and "step 3" in s]
    assert inserted, "no frame showed the inserted slot at step 3"
    plain = inserted[0].replace("\x1b", "")
    assert plain.index("The") < plain.index(INSERT_CELL) < plain.index("cat"), "the slot opens before ' cat'"


@needs_runtime
def test_chat_on_a_22_checkpoint_reports_its_inserts_and_deletes(tmp_path):
    """End to end on a real (tiny, random) 2.2 GGUF through the runtime: the answer's stats line counts inserts
    and deletes, and a live frame showed an inserted slot or a struck-out token."""
    from converters import convert
    from test_chat_tmux import chat_pane
    from test_llada22 import write_llada22

    write_llada22(tmp_path / "ckpt", edit_boost=3.0)
    path = convert(tmp_path / "ckpt", tmp_path / "tiny22.gguf", outtype="f32").path
    home = tmp_path / "home"
    home.mkdir()
    pane = chat_pane(home, tmp_path, str(path), "--threads", "1", "--plain", "--mode", "speed", "--max-tokens", "64")
    try:
        pane.line("Tell me about the fox.")
        struck = re.compile(r"\x1b\[(?:[0-9]+;)*9m")
        shots = frames(pane, " tokens · ", timeout=240)  # the stats line after the answer
        final = pane.capture(history=True)
    finally:
        pane.close()
    stats = [ln for ln in final.splitlines() if "tok/fwd" in ln and " ins · " in ln]
    assert stats and re.search(r"[1-9]\d* ins · \d+ del|\d+ ins · [1-9]\d* del", stats[-1]), final
    assert any(INSERT_CELL in s or struck.search(s) for s in shots), "no live frame showed an insert or a delete"
