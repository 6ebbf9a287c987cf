"""``dllm chat`` in a real terminal (tmux) on a *fast* model: ``--view-pace`` makes the live view visible frame
by frame without adding to the decode time; ``--view-pace 0`` draws as fast as the model decodes, as before.
The embedded demo model's banner suggests prompts it can answer. Reuses ``test_chat_tmux``'s pane."""
from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest

from dllm_cli.cli.chat_cmd import DEMO_PROMPTS
from dllm_cli.cli.live import MASK_CELL
from test_chat_tmux import DLLM, PROMPT, Pane, chat_pane, needs_runtime, needs_tmux

STATS = re.compile(r"(\d+) tokens · (\d+) fwd · .* · (\d+\.\d+)s")


@pytest.fixture(scope="module")
def fast_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random LLaDA2.1 model: a few ms per forward, so a whole answer decodes in about 0.1 s (the demo
    model's case), and flat logits (small head scale) unmask about one token per forward: many frames."""
    from converters import convert
    from dllm_cli.demo.checkpoint import tiny_config, write_checkpoint

    ckpt = tmp_path_factory.mktemp("fast_ckpt") / "LLaDA2.1-fast-tiny"
    write_checkpoint(ckpt, tiny_config(), seed=3, head_scale=0.05)
    out = tmp_path_factory.mktemp("fast_gguf") / "fast-tiny-f32.gguf"
    return convert(ckpt, out, outtype="f32", model_version="2.1").path


@pytest.fixture
def start(dllm_home: Path, tmp_path: Path):
    panes: list[Pane] = []

    def run(*args: str) -> Pane:
        panes.append(chat_pane(dllm_home, tmp_path, "--threads", "1", "--plain", *args))
        return panes[-1]

    yield run
    for p in panes:
        p.close()


def ask(pane: Pane, question: str, answers_before: int = 0) -> tuple[list[tuple[str, ...]], float, re.Match]:
    """Ask; poll the screen until the stats line of this answer. Returns the distinct live-view frames seen
    before it (the lines holding mask cells), the wall time from Enter to the stats line, and the stats."""
    frames: list[tuple[str, ...]] = []
    pane.line(question)
    t0 = time.monotonic()
    end = t0 + 120
    while time.monotonic() < end:
        screen = pane.capture()
        wall = time.monotonic() - t0
        stats = [m for m in map(STATS.search, pane.capture(history=True).splitlines()) if m]
        if len(stats) > answers_before:
            return frames, wall, stats[-1]
        rows = tuple(ln for ln in screen.splitlines() if MASK_CELL in ln)
        if rows and rows not in frames:
            frames.append(rows)
        time.sleep(0.02)
    pytest.fail(f"no answer in tmux; last capture:\n{pane.capture()}")


@needs_runtime
@needs_tmux
def test_paced_view_shows_the_masks_frame_by_frame_and_reports_decode_time_only(start, fast_model):
    pane = start(str(fast_model), "--view-pace", "150", "--max-tokens", "16")
    assert "try:" not in pane.capture()  # example prompts are for the demo model only
    frames, wall, stats = ask(pane, "hello")
    assert len(frames) >= 3, frames  # at least three distinct intermediate frames with masks, before the answer
    decode_s, forwards = float(stats.group(3)), int(stats.group(2))
    assert forwards >= 8
    assert decode_s + 2 * 0.150 < wall, (decode_s, wall)  # the stats line reports decoding, not the drawing
    final = pane.wait(lambda t: t.count(PROMPT) >= 2)
    assert MASK_CELL not in final  # the transient view left nothing behind


@needs_runtime
@needs_tmux
def test_view_pace_0_draws_as_fast_as_the_model_and_set_view_pace_turns_pacing_on(start, fast_model):
    pane = start(str(fast_model), "--view-pace", "0", "--max-tokens", "32")
    _frames, wall, stats = ask(pane, "hello")
    decode_s, forwards = float(stats.group(3)), int(stats.group(2))
    # the default pace would hold min(forwards, 40) frames 50 ms each (>= 1.5 s): none of that is added here
    assert forwards >= 30 and wall < decode_s + 1.0, (decode_s, wall)
    pane.line("/set view_pace 50")
    pane.wait_for("view_pace=50 ms")
    _frames, wall, stats = ask(pane, "hello", answers_before=1)
    assert wall > float(stats.group(3)) + 1.0, (stats.group(0), wall)
    pane.line("/exit")
    pane.wait_for("EXIT=0")


@needs_runtime
@needs_tmux
def test_ctrl_c_while_the_paced_view_catches_up_prints_the_finished_answer(start, fast_model, tmp_path: Path):
    """The model finished long before the slow view: Ctrl-C skips the rest of the view, the answer and its stats
    are printed as usual and the transcript keeps it whole (not interrupted)."""
    pane = start(str(fast_model), "--view-pace", "400", "--max-tokens", "16")
    pane.line("hello")
    pane.wait(lambda t: MASK_CELL in t and "block" in t, timeout=60, every=0.01, history=False)
    pane.send("C-c")
    final = pane.wait(lambda t: t.count(PROMPT) >= 2 and STATS.search(t) is not None, timeout=10)
    assert "interrupted" not in final and MASK_CELL not in final, final
    pane.line(f"/save {tmp_path / 'chat.json'}")
    pane.wait_for("saved ")
    turn = json.loads((tmp_path / "chat.json").read_text())["turns"][-1]
    assert turn["interrupted"] is False and turn["stats"]["forwards"] >= 8 and turn["content"]
    pane.line("hello again")  # the session goes on
    pane.wait(lambda t: len(STATS.findall(t)) >= 2, timeout=60)


@needs_runtime
@needs_tmux
def test_demo_banner_lists_three_example_prompts(start):
    pane = start()  # no model: the embedded demo model
    screen = pane.capture()
    assert "demo.gguf" in screen and "try:" in screen, screen
    for prompt, _why in DEMO_PROMPTS:
        assert f"  {prompt} " in screen, screen
    pane.line(DEMO_PROMPTS[2][0])
    pane.wait_for("mode speed: threshold=")
    pane.send("C-d")
    pane.wait_for("EXIT=0")


@needs_runtime
def test_demo_model_answers_the_banner_examples():
    """The prompts the banner suggests are ones the demo model answers: a retrained demo model that does not
    fails here (and the banner must change with it)."""
    short, open_question = DEMO_PROMPTS[0][0], DEMO_PROMPTS[1][0]
    r = subprocess.run([str(DLLM), "chat", "--threads", "1", "--max-tokens", "64"],
                       input=f"{short}\n/clear\n{open_question}\n/clear\n/mode speed\n{open_question}\n", capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    answers = r.stdout.splitlines()
    assert len(answers) == 3, r.stdout
    assert answers[0] == "1 3 7 9"
    for a in answers[1:]:
        assert "banana" in a and "yellow" in a and len(a.split()) >= 6, a
