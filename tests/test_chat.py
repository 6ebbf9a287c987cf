"""dllm chat without a model: the live view's renderables from synthetic events, the conversation state
(save, retry, clear, interruption), settings, trace replay and the non-TTY fallback."""
from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from dllm_cli.chat import Chat, Conversation, parse_setting
from dllm_cli.cli import live as L
from dllm_cli.cli.replay import paced, read_trace, trace_record
from dllm_cli.decoding.config import make_config
from dllm_cli.decoding.events import BlockEvent, DoneEvent, StartEvent, StepEvent
from dllm_cli.errors import ContextFullError, DllmError, UsageError

M = 99  # mask id
VOCAB = {1: "Hel", 2: "lo", 3: " wor", 4: "ld", 5: " word", 6: "!", 7: "\n", 8: "<eos>"}
ANSI = re.compile(r"\x1b\[")


def events(mode: str = "speed") -> list:
    """Prompt of 6 tokens (block 1 holds 2 prompt-tail tokens), blocks of 4, two generated blocks.

    Steps count from 0 as the engine's do. Block 1: step 0 unmasks "Hel" "lo"; block 2: step 0 unmasks " word"
    and "!", step 1 edits " word" -> " wor",
    unmasks "ld" ... final text "Hello wor!ld".
    """
    cfg = {"mode": mode}
    return [
        StartEvent(prompt_tokens=6, reused=4, block_length=4, mask_id=M, first_block=1, n_blocks=3, config=cfg),
        StepEvent(block=1, step=0, start=4, canvas=(10, 11, 1, 2), unmasked=(2, 3), edited=(), probs=(0.9, 0.8),
                  forwards=1, commits=0, mask_count=0, elapsed_s=0.10),
        BlockEvent(block=1, ids=(1, 2), text="Hello", forwards=2, elapsed_s=0.20),
        StepEvent(block=2, step=0, start=8, canvas=(5, M, 6, M), unmasked=(0, 2), edited=(), probs=(0.7, 0.6),
                  forwards=3, commits=1, mask_count=2, elapsed_s=0.30),
        StepEvent(block=2, step=1, start=8, canvas=(3, 4, 6, M), unmasked=(1,), edited=((0, 5, 3),),
                  probs=(0.8, 0.9), forwards=4, commits=1, mask_count=1, elapsed_s=0.40),
        BlockEvent(block=2, ids=(3, 6, 4, 8), text=" wor!ld", forwards=6, elapsed_s=0.60),
        DoneEvent(ids=(1, 2, 3, 6, 4, 8), text="Hello wor!ld", prompt_tokens=6, finish_reason="eos", forwards=6,
                  commits=2, steps=4, edits=1, tpf=1.0, elapsed_s=0.60, reused=4),
    ]


def piece(t: int) -> str:
    return VOCAB.get(t, f"#{t}")


def styles_of(text, substring: str, after: int = 0) -> set[str]:
    """Styles of the spans covering the first ``substring`` at or after ``after`` in a rich Text."""
    start = text.plain.index(substring, after)
    end = start + len(substring)
    return {str(s.style) for s in text.spans if s.start <= start and s.end >= end}


# --- live view -----------------------------------------------------------------------------------
def test_block_row_masks_are_dim_placeholders_and_new_tokens_highlighted():
    ev = events()
    view = L.LiveView(piece).feed(ev[:4])  # block 2, step 1: " word" ░ "!" ░
    row = view.block_row()
    assert row.plain == " word░!░"
    assert row.plain.count(L.MASK_CELL) == 2
    assert styles_of(row, " word") == {L.NEW_STYLE}
    assert {str(s.style) for s in row.spans if row.plain[s.start:s.end] == L.MASK_CELL} == {L.MASK_STYLE}


def test_block_row_leaves_out_prompt_tail_and_shows_edit_as_old_arrow_new():
    ev = events()
    view = L.LiveView(piece).feed(ev[:2])
    assert view.block_row().plain == "Hello"  # positions 4, 5 are the prompt's tail
    view.feed(ev[2:5])  # block 2 step 2: " word" edited to " wor", "ld" unmasked
    row = view.block_row()
    assert row.plain == " word→ wor" + "ld" + "!" + L.MASK_CELL
    assert styles_of(row, " word") == {L.EDIT_OLD_STYLE}
    assert styles_of(row, " wor", row.plain.index("→")) == {L.EDIT_NEW_STYLE}
    assert styles_of(row, "ld") == {L.NEW_STYLE}
    assert "!" in row.plain and not styles_of(row, "!")  # decoded earlier: plain


def test_status_line_numbers():
    ev = events("speed")
    view = L.LiveView(piece).feed(ev[:5])
    # 2 finalized + 3 decoded cells of block 2 = 5 tokens over 4 forwards in 0.4 s; 1 edit so far
    assert view.status_line().plain == ("speed · block 2/2 · step 2 · 4 fwd · 1.25 tok/fwd · 1 edit · 12.5 tok/s"
                                        " · 4 cached")
    view.feed(ev[5:])
    assert view.tokens == 6 and view.edits == 1 and view.text == "Hello wor!ld"
    assert view.status_line().plain.startswith("speed · block 2/2 · step 0 · 6 fwd · 1.00 tok/fwd · 1 edit · 10.0 tok/s")


def test_render_shows_finalized_text_above_the_block_and_keeps_the_tail_when_long():
    view = L.LiveView(piece).feed(events()[:4])
    con = Console(record=True, width=40, height=20, file=io.StringIO())
    con.print(view)
    lines = con.export_text().splitlines()
    assert lines[0] == "Hello" and lines[1] == " word░!░" and lines[2].startswith("speed · block 2/2")
    view.text = "".join(f"line {i}\n" for i in range(100))
    view.max_text_lines = 3
    con = Console(record=True, width=40, file=io.StringIO())
    con.print(view)
    out = con.export_text().splitlines()
    assert out[:3] == ["line 97", "line 98", "line 99"] and "line 96" not in out


def test_visible_cells_and_piece_cache():
    assert L.visible("a\nb\t") == "a↵b⇥" and L.visible("") == "∅"
    calls = []
    cache = L.PieceCache(lambda t: calls.append(t) or "x")
    assert cache(3) == cache(3) == "x" and calls == [3]
    assert L.PieceCache()(42) == "⟨42⟩"


def test_summary_line():
    done = events()[-1]
    assert L.summary_line(done, "quality") == ("quality · 6 tokens · 6 fwd · 1.00 tok/fwd · 1 edit · 10.0 tok/s · "
                                               "0.60s · 4 prompt tokens cached")


# --- conversation state ----------------------------------------------------------------------------
def conversation() -> Conversation:
    c = Conversation(system="Be brief.")
    c.add_user("hi")
    c.add_answer("Hello!", stats={"tokens": 3})
    c.add_user("code?")
    c.add_answer("```py\nprint(1)\n```", interrupted=True)
    return c


def test_messages_keep_system_and_interrupted_answers():
    assert conversation().messages() == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "code?"},
        {"role": "assistant", "content": "```py\nprint(1)\n```"}]


def test_save_markdown_and_json_atomically(tmp_path: Path):
    c = conversation()
    md = c.save(tmp_path / "t.md").read_text()
    assert md.startswith("# dllm chat\n\n**System:** Be brief.\n")
    assert "## User\n\nhi\n\n## Assistant\n\nHello!\n\n<!-- tokens=3 -->" in md
    assert "## Assistant (interrupted)\n\n```py\nprint(1)\n```\n" in md
    doc = json.loads(c.save(tmp_path / "t.json").read_text())
    assert doc["system"] == "Be brief." and [t["role"] for t in doc["turns"]] == ["user", "assistant"] * 2
    assert doc["turns"][3] == {"role": "assistant", "content": "```py\nprint(1)\n```", "interrupted": True,
                               "stats": {}}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.json", "t.md"]  # no temp files left
    with pytest.raises(UsageError, match="md or .json"):
        c.save(tmp_path / "t.txt")
    with pytest.raises(DllmError, match="directory does not exist"):
        c.save(tmp_path / "missing" / "t.md")


def test_retry_and_clear():
    c = conversation()
    assert c.pop_for_retry() == "code?" and [t.content for t in c.turns] == ["hi", "Hello!"]
    c.clear()
    assert c.turns == [] and c.system == "Be brief."
    with pytest.raises(UsageError, match="nothing to retry"):
        c.pop_for_retry()


@pytest.mark.parametrize("name,text,expected", [
    ("threshold", "0.6", ("threshold", 0.6)), ("top-k", "5", ("top_k", 5)), ("editing", "off", ("editing", False)),
    ("seed", "none", ("seed", None)), ("MAX_TOKENS", " 64 ", ("max_tokens", 64)),
])
def test_parse_setting(name, text, expected):
    assert parse_setting(name, text) == expected


@pytest.mark.parametrize("name,text,msg", [
    ("nope", "1", "unknown setting"), ("top_k", "1.5", "an integer"), ("threshold", "high", "a number"),
    ("editing", "maybe", "on/off"),
])
def test_parse_setting_rejects(name, text, msg):
    with pytest.raises(UsageError, match=msg):
        parse_setting(name, text)


class FakeSession:
    def __init__(self) -> None:
        self.cached = [1, 2, 3]
        self.rollbacks: list[int] = []
        self.resets = 0

    def rollback(self, pos: int) -> None:
        self.rollbacks.append(pos)

    def reset(self) -> None:
        self.resets += 1


class FakeLoaded:
    def __init__(self) -> None:
        self.session = FakeSession()


class ScriptedChat(Chat):
    """A Chat whose model is a list of events (and optionally an error raised after some of them)."""

    def __init__(self, evs, fail_after: int | None = None, error: BaseException | None = None) -> None:
        super().__init__(FakeLoaded(), make_config("speed", "2.1"), system="sys")
        self.evs, self.fail_after, self.error = evs, fail_after, error
        self.prompts: list[list[dict]] = []

    def prompt(self):
        self.prompts.append(self.conversation.messages())
        return [0] * 6

    def stream(self, ids):
        for i, ev in enumerate(self.evs):
            if i == self.fail_after:
                raise self.error
            yield ev


def test_chat_turn_records_the_answer_with_stats():
    chat = ScriptedChat(events())
    list(chat.ask("hi"))
    t = chat.conversation.turns[-1]
    assert (t.role, t.content, t.interrupted) == ("assistant", "Hello wor!ld", False)
    assert t.stats["tokens"] == 6 and t.stats["edits"] == 1 and t.stats["reused_prompt_tokens"] == 4
    list(chat.retry())
    assert [x.content for x in chat.conversation.turns] == ["hi", "Hello wor!ld"]
    assert chat.prompts[1] == [{"role": "system", "content": "sys"}, {"role": "user", "content": "hi"}]
    chat.clear()
    assert chat.conversation.turns == [] and chat.loaded.session.resets == 1


def test_chat_interrupt_keeps_partial_answer_and_repairs_the_cache():
    chat = ScriptedChat(events())
    gen = chat.ask("hi")
    for ev in gen:
        if isinstance(ev, StepEvent) and ev.block == 2:
            break
    gen.close()  # what the CLI does on Ctrl-C
    t = chat.conversation.turns[-1]
    assert (t.content, t.interrupted) == ("Hello", True)
    assert chat.loaded.session.rollbacks == [3]  # drop cells beyond the committed prefix
    chat2 = ScriptedChat(events(), fail_after=3, error=KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        list(chat2.ask("hi"))
    assert chat2.conversation.turns[-1].interrupted and chat2.conversation.turns[-1].content == "Hello"


def test_chat_context_full_drops_the_question_and_keeps_the_session():
    chat = ScriptedChat(events(), fail_after=0, error=ContextFullError("the context is full"))
    with pytest.raises(ContextFullError):
        list(chat.ask("hi"))
    assert chat.conversation.turns == [] and chat.loaded.session.rollbacks == [3]


def test_chat_set_validates_and_keeps_config_on_bad_values():
    chat = ScriptedChat(events())
    assert chat.set("threshold", "0.6").threshold == 0.6
    before = chat.config
    for name, value in (("threshold", "1.5"), ("top_p", "0"), ("max_tokens", "0"), ("block_length", "-1")):
        with pytest.raises(UsageError):
            chat.set(name, value)
        assert chat.config is before
    assert chat.overrides == {"threshold": 0.6}


# --- replay --------------------------------------------------------------------------------------
def write_trace(path: Path, evs) -> Path:
    seen: set[int] = set()
    path.write_text("".join(json.dumps(trace_record(e, piece, seen)) + "\n" for e in evs))
    return path


def test_trace_record_spells_each_id_once_and_read_trace_round_trips(tmp_path: Path):
    evs = events()
    path = write_trace(tmp_path / "t.jsonl", evs)
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert lines[1]["pieces"] == {"1": "Hel", "2": "lo", "10": "#10", "11": "#11"}
    assert lines[3]["pieces"] == {"5": " word", "6": "!", "99": "#99"} and "pieces" not in lines[2]
    assert lines[4]["pieces"] == {"3": " wor", "4": "ld"} and lines[4]["edited"] == [[0, 5, 3]]
    trace = read_trace(path)
    assert trace.events == evs
    assert L.LiveView(L.PieceCache(table=trace.pieces)).feed(evs[:5]).block_row().plain.startswith(" word→")


def test_read_trace_errors(tmp_path: Path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"event": "start"}\n')
    with pytest.raises(UsageError, match="bad.jsonl:1"):
        read_trace(bad)
    with pytest.raises(UsageError, match="cannot read trace"):
        read_trace(tmp_path / "missing.jsonl")


def test_paced_replays_gaps_divided_by_speed():
    waits: list[float] = []
    assert list(paced(events(), 2.0, sleep=waits.append)) == events()
    assert waits == pytest.approx([0.05, 0.05, 0.05, 0.05, 0.1])
    waits.clear()
    list(paced(events(), 0, sleep=waits.append))
    assert waits == []


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "from dllm_cli.cli.app import main; main()", *args], capture_output=True, text=True,
                          timeout=60)


def test_replay_without_a_tty_prints_plain_answer_text_only(tmp_path: Path):
    path = write_trace(tmp_path / "t.jsonl", events())
    r = run_cli("chat", "--replay", str(path), "--speed", "0")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "Hello wor!ld\n" and not ANSI.search(r.stdout)
    r = run_cli("chat", "--replay", str(tmp_path / "missing.jsonl"))
    assert r.returncode == 2 and r.stdout == "" and "cannot read trace" in r.stderr


def test_replay_live_view_on_a_terminal(tmp_path: Path, monkeypatch):
    """With a terminal on stderr the view is drawn there (frames with masks), the answer lands on stdout."""
    from dllm_cli.cli import chat_cmd, output, screen as screen_mod

    err = io.StringIO()
    monkeypatch.setattr(output, "err", Console(file=err, force_terminal=True, width=60, height=20))
    screen = chat_cmd.Screen(live=True, plain=True, piece=piece)
    frames: list[str] = []
    monkeypatch.setattr(screen_mod, "FRAME_S", 0.0)
    real_update = screen.view.update

    def spy(ev):
        real_update(ev)
        if isinstance(ev, StepEvent):
            frames.append(screen.view.block_row().plain)

    monkeypatch.setattr(screen.view, "update", spy)
    done = screen.show(iter(events()), "speed")
    assert done is not None and done.text == "Hello wor!ld"
    drawn = err.getvalue()
    assert L.MASK_CELL in drawn and "→" in drawn and "speed · block" in drawn
    assert frames[-1] == " word→ wor" + "ld!" + L.MASK_CELL


def test_an_edit_lingers_faintly_for_a_moment_then_reads_as_plain_text():
    ev = events()
    view = L.LiveView(piece).feed(ev[:5])  # " word" -> " wor" edited at 0.40 s
    later = StepEvent(block=2, step=2, start=8, canvas=(3, 4, 6, 7), unmasked=(3,), edited=(), probs=(0.9,),
                      forwards=5, commits=1, mask_count=0, elapsed_s=0.40 + L.EDIT_LINGER_S / 2)
    view.update(later)
    row = view.block_row()
    assert row.plain == " word→ wor" + "ld!↵"
    assert styles_of(row, " word") == {L.RECENT_OLD_STYLE}
    view.update(StepEvent(**{**later.__dict__, "step": 3, "unmasked": (), "elapsed_s": 0.41 + L.EDIT_LINGER_S}))
    assert view.block_row().plain == " world!↵"


def test_repl_keeps_going_after_bad_commands_and_a_full_context(tmp_path: Path, capsys):
    from dllm_cli.cli.chat_cmd import Repl, Screen

    chat = ScriptedChat(events(), fail_after=0, error=ContextFullError("the context is full (4100 > 4096 tokens)"))
    repl = Repl(chat, Screen(live=False, plain=True))
    for line in ("/set threshold 7", "/set threshold", "/bogus", "/save x.txt", f"/save {tmp_path / 'a.md'}"):
        assert repl.command(line) is None
    repl.turn(chat.ask("hi"))
    assert repl.command("/exit") is False
    out = capsys.readouterr()
    assert out.out == ""
    err = out.err
    assert "--threshold must be in [0, 1], got 7.0" in err and "/set threshold needs a value" in err
    assert "unknown command /bogus" in err and "use a .md or .json file name" in err and "saved " in err
    assert "the context is full (4100 > 4096 tokens)" in err and "/clear" in err
    assert chat.conversation.turns == [] and (tmp_path / "a.md").is_file()


def test_special_tokens_are_drawn_short():
    assert L.visible("<|endoftext|>") == "␄" and L.visible("<|role_end|>") == "‹role_end›"
    assert L.visible("<|") == "<|" and L.visible("<role>") == "<role>"


def test_tokens_stop_counting_at_the_first_stop_id():
    start = StartEvent(prompt_tokens=4, reused=0, block_length=4, mask_id=M, first_block=1, n_blocks=2,
                       config={"mode": "speed", "stop_ids": [8]})
    step = StepEvent(block=1, step=0, start=4, canvas=(1, 8, 8, 8), unmasked=(0, 1, 2, 3), edited=(),
                     probs=(0.9,) * 4, forwards=1, commits=0, mask_count=0, elapsed_s=0.5)
    view = L.LiveView(piece).feed([start, step])
    assert view.tokens == 2 and view.block_row().plain == "Hel<eos><eos><eos>"


def test_status_before_the_first_step_says_the_prompt_is_being_read():
    view = L.LiveView(piece, mode="quality")
    assert view.status_line().plain == "quality · reading the prompt"
    view.update(events()[0])
    assert view.status_line().plain == "quality · 6 prompt tokens, 4 cached"
