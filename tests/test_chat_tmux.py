"""``dllm chat`` in a real terminal (tmux), on a tiny random model converted for the test.

Skipped with the reason when tmux or a runtime built from the current patches is missing. Captures are
polled (no long fixed sleeps): 2 slow CI cores must still pass. The KV-reuse check runs through the library.
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from dllm_cli.cli.live import MASK_CELL
from runtime_marks import needs_runtime

DLLM = Path(sys.executable).with_name("dllm")
PROMPT = ">>>"  # capture-pane drops trailing spaces


needs_tmux = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random LLaDA2.1 model big enough that an answer takes a few seconds (masks visible mid-answer).

    Flat logits (small head scale) keep confidences low: about one token per forward, and in speed mode
    (editing threshold 0) the argmax keeps changing under new context, so edits fire.
    """
    from converters import convert
    from dllm_cli.demo.checkpoint import tiny_config, write_checkpoint

    ckpt = tmp_path_factory.mktemp("chat_ckpt") / "LLaDA2.1-chat-tiny"
    write_checkpoint(ckpt, tiny_config(hidden_size=256, num_hidden_layers=4, intermediate_size=512,
                                       moe_intermediate_size=128, head_dim=32, num_attention_heads=8,
                                       num_key_value_heads=4), seed=3, head_scale=0.05)
    out = tmp_path_factory.mktemp("chat_gguf") / "chat-tiny-f32.gguf"
    return convert(ckpt, out, outtype="f32", model_version="2.1").path


class Pane:
    """One tmux session on a private server socket, running ``command`` in a 120x40 terminal."""

    def __init__(self, command: str, env: dict[str, str], cwd: Path) -> None:
        self.socket = f"dllm-test-{uuid.uuid4().hex[:8]}"
        self.name = "chat"
        exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
        # keep the pane after the command ends so the exit code can be read
        script = f"cd {shlex.quote(str(cwd))} && env {exports} {command}; echo EXIT=$?; sleep 600"
        self.tmux("new-session", "-d", "-s", self.name, "-x", "120", "-y", "40", script)

    def tmux(self, *args: str) -> str:
        r = subprocess.run(["tmux", "-L", self.socket, *args], capture_output=True, text=True, timeout=30)
        return r.stdout

    def send(self, *keys: str, literal: bool = False) -> None:
        self.tmux("send-keys", "-t", self.name, *(["-l"] if literal else []), *keys)

    def line(self, text: str) -> None:
        self.send(text, literal=True)
        self.send("Enter")

    def capture(self, history: bool = False) -> str:
        """The visible screen, or with ``history`` everything since the start (for counting prompts)."""
        return self.tmux("capture-pane", "-p", "-t", self.name, *(["-S", "-"] if history else []))

    def wait(self, pred, timeout: float = 60.0, every: float = 0.02, history: bool = True) -> str:
        """Poll captures until ``pred(text)``; returns the capture (fails with the last one on timeout)."""
        end = time.monotonic() + timeout
        text = ""
        while time.monotonic() < end:
            text = self.capture(history)
            if pred(text):
                return text
            time.sleep(every)
        pytest.fail(f"timed out waiting in tmux; last capture:\n{text}")

    def wait_for(self, needle: str, timeout: float = 60.0) -> str:
        return self.wait(lambda t: needle in t, timeout)

    def close(self) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True, timeout=30)


def chat_pane(dllm_home: Path, cwd: Path, *args: str) -> Pane:
    """``dllm chat ARGS`` in a new pane, once its prompt is up."""
    env = {"DLLM_HOME": str(dllm_home), "DLLM_RUNTIME_DIR": os.environ["DLLM_RUNTIME_DIR"],
           "TERM": "xterm-256color", "PYTHONUNBUFFERED": "1"}
    pane = Pane(" ".join(shlex.quote(a) for a in [str(DLLM), "chat", *args]), env, cwd)
    pane.wait_for(PROMPT, timeout=120)
    return pane


@pytest.fixture
def chat(model: Path, dllm_home: Path, tmp_path: Path):
    panes: list[Pane] = []

    def start(*args: str) -> Pane:
        panes.append(chat_pane(dllm_home, tmp_path, str(model), "--threads", "1", *args))
        return panes[-1]

    yield start
    for p in panes:
        p.close()


@needs_runtime
@needs_tmux
def test_live_view_shows_masks_then_the_answer_and_edits_in_speed_mode(chat):
    pane = chat("--mode", "speed", "--max-tokens", "128", "--plain")
    pane.line("Tell me a long story about a fox.")
    mid = pane.wait(lambda t: MASK_CELL in t and "tok/fwd" in t and "speed · block" in t, timeout=120,
                    every=0.005, history=False)
    assert "fwd" in mid
    seen_edit = False
    captures = []
    end = time.monotonic() + 300
    while time.monotonic() < end:
        text = pane.capture()
        captures.append(text)
        seen_edit = seen_edit or ("→" in text and MASK_CELL in text)
        if pane.capture(history=True).count(PROMPT) >= 2:
            break
        time.sleep(0.005)
    final = pane.capture(history=True)
    assert final.count(PROMPT) >= 2, final
    assert MASK_CELL not in final  # the transient live view left nothing behind
    summary = [ln for ln in final.splitlines() if "tokens ·" in ln and "tok/fwd" in ln]
    assert summary and summary[-1].startswith("speed · "), final
    assert seen_edit, "no capture showed an edit drawn as old→new"


@needs_runtime
@needs_tmux
def test_a_line_typed_during_an_answer_is_asked_next(chat):
    """Typing ahead while the live view draws does not echo over it (an echoed Enter moves the cursor, and the
    transient view then leaves a stale frame behind); the line is kept and asked as the next question."""
    pane = chat("--mode", "speed", "--max-tokens", "64", "--plain")
    pane.line("Tell me a long story about a fox.")
    pane.wait(lambda t: MASK_CELL in t and "speed · block" in t, timeout=120, every=0.005, history=False)
    pane.line("typed ahead")
    final = pane.wait(lambda t: t.count(PROMPT) >= 3, timeout=300)
    assert MASK_CELL not in final and "speed · block" not in final, final  # the live view left nothing behind
    assert f"{PROMPT} typed ahead" in final and final.count("typed ahead") == 1, final
    assert len([ln for ln in final.splitlines() if "tokens ·" in ln and "tok/fwd" in ln]) == 2, final


@needs_runtime
@needs_tmux
def test_slash_commands_interrupt_save_and_exit(chat, tmp_path: Path, dllm_home: Path):
    pane = chat("--max-tokens", "512", "--plain")
    pane.line("/mode speed")
    pane.wait_for("mode speed: threshold=")
    pane.line("/set threshold 0.6")
    pane.wait_for("threshold=0.6")
    pane.line("/set threshold 2")
    pane.wait_for("--threshold must be in [0, 1], got 2.0")
    pane.line("/set top_k lots")
    pane.wait_for("--top-k takes an integer")  # the same domain table as the flag
    pane.line("/nope")
    pane.wait_for("unknown command /nope")
    # a short answer, then one interrupted by Ctrl-C mid-generation
    pane.line("/set max_tokens 32")
    pane.line("hello")
    pane.wait(lambda t: "tokens ·" in t and t.count(PROMPT) >= 8, timeout=120)
    pane.line("/set max_tokens 512")
    pane.line("Tell me everything.")
    pane.wait(lambda t: MASK_CELL in t, timeout=120, every=0.005, history=False)
    pane.send("C-c")
    pane.wait_for("interrupted", timeout=60)
    pane.wait(lambda t: t.rstrip().endswith(PROMPT), timeout=60)
    pane.line(f"/save {tmp_path / 'chat.json'}")
    pane.wait_for("saved ")
    doc = json.loads((tmp_path / "chat.json").read_text())
    assert [t["role"] for t in doc["turns"]] == ["user", "assistant", "user", "assistant"]
    assert doc["turns"][1]["interrupted"] is False and doc["turns"][1]["stats"]["mode"] == "speed"
    assert doc["turns"][3]["interrupted"] is True
    pane.line(f"/save {tmp_path / 'chat.md'}")
    pane.wait(lambda t: t.count("saved ") >= 2)
    assert "## Assistant (interrupted)" in (tmp_path / "chat.md").read_text()
    pane.line("/clear")
    pane.wait_for("conversation cleared")
    pane.line(f"/save {tmp_path / 'empty.json'}")
    pane.wait(lambda t: t.count("saved ") >= 3)
    assert json.loads((tmp_path / "empty.json").read_text())["turns"] == []
    pane.line("/retry")
    pane.wait_for("nothing to retry yet")
    pane.send("C-d")
    pane.wait_for("EXIT=0")
    history = (dllm_home / "chat_history").read_text()
    assert "/mode speed" in history and "Tell me everything." in history  # readline history kept


@needs_runtime
@needs_tmux
def test_ctrl_c_at_an_empty_prompt_exits_130(chat):
    """Like every Ctrl-C that ends dllm (README, exit codes); Ctrl-D and /exit are the ways out with 0."""
    pane = chat()
    pane.send("half a thought", literal=True)
    pane.send("C-c")  # a typed line is dropped, the chat goes on
    pane.wait(lambda t: t.count(PROMPT) >= 2)
    pane.send("C-c")
    final = pane.wait_for("EXIT=130")
    assert "interrupted" in final and "Traceback" not in final


@needs_runtime
def test_piped_chat_prints_plain_answers_only(model: Path):
    r = subprocess.run([str(DLLM), "chat", str(model), "--max-tokens", "16", "--threads", "1"],
                       input="hi\n/mode speed\nhello again\n", capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "\x1b[" not in r.stdout and MASK_CELL not in r.stdout and ">>>" not in r.stdout
    assert "mode speed" in r.stderr


@needs_runtime
def test_second_turn_reuses_the_kv_prefix_and_matches_a_cold_run(model: Path):
    """Turn 2 reuses turn 1's committed blocks (StartEvent.reused > 0) and yields the same ids as a cold run."""
    from dllm_cli.chat import Chat
    from dllm_cli.decoding.events import DoneEvent, StartEvent
    from dllm_cli.generate import decode_config, load, stream_generate
    from dllm_cli.runtime.options import RuntimeOptions

    loaded = load(str(model), RuntimeOptions(threads=1, kv_type="f32", flash_attn=False, ctx_size=1024))
    try:
        config = decode_config(loaded.model, "quality", max_tokens=48, seed=0)
        chat = Chat(loaded, config, system="Be brief.")
        list(chat.ask("What is a fox?"))
        events = list(chat.ask("And a dog?"))
        start = next(e for e in events if isinstance(e, StartEvent))
        warm = next(e for e in events if isinstance(e, DoneEvent))
        assert start.reused > 0 and start.reused % loaded.session.block_length == 0
        chat.conversation.turns.pop()  # the prompt of turn 2 again, cold
        ids = chat.prompt()
        loaded.session.reset()
        cold_events = list(stream_generate(loaded, ids, config))
        cold_start = next(e for e in cold_events if isinstance(e, StartEvent))
        cold = next(e for e in cold_events if isinstance(e, DoneEvent))
        assert cold_start.reused == 0
        assert cold.ids == warm.ids and cold.text == warm.text
    finally:
        loaded.close()
