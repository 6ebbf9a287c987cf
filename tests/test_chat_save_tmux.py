"""In a real terminal (tmux): a ``/save`` that cannot be written says why in one line and the session goes on,
with the conversation intact (saved afterwards to a good path). Reuses ``test_chat_tmux``'s pane and model."""
from __future__ import annotations

from pathlib import Path

from test_chat_tmux import PROMPT, chat, model, needs_runtime, needs_tmux  # noqa: F401  (fixtures)


@needs_runtime
@needs_tmux
def test_failed_saves_keep_the_session_and_the_conversation(chat, tmp_path: Path):  # noqa: F811
    pane = chat("--max-tokens", "16", "--plain")
    bad = ["/save /dev/full/x.md", f"/save {tmp_path}/missing/x.md", "/save /proc/x.json", "/save /sys/x.md"]
    for i, line in enumerate(bad, 1):
        pane.line(line)
        pane.wait(lambda t, i=i: t.count("cannot write the transcript") >= i, timeout=60)
    pane.line("hello there")
    pane.wait(lambda t: "tokens ·" in t and t.count(PROMPT) >= len(bad) + 2, timeout=120)
    good = tmp_path / "ok.md"
    pane.line(f"/save {good}")
    pane.wait_for("saved ")
    pane.line("/exit")
    final = pane.wait_for("EXIT=0", timeout=60)
    assert "Traceback" not in final and "internal error" not in final, final
    assert "hello there" in good.read_text()  # the conversation survived the failed saves
    assert not list(tmp_path.rglob("*.part"))
