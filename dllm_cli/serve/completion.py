"""From decoding events to what a client may see: final text only, stop strings cut, tool calls parsed.

Streaming is block-granular: a block's text is final once its ``BlockEvent`` arrives (later steps never edit
it), so ``TextStream`` releases text per block and holds back only a tail that could still turn into a stop
string or a ``<tool_call>``. ``Tally`` keeps the usage figures, including dllm's own (forwards, edits).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from dllm_cli.decoding.events import BlockEvent, DoneEvent, Event, StartEvent, StepEvent
from dllm_cli.serve.tools import CALL_OPEN, parse_tool_calls

FINISH = {"eos": "stop", "length": "length"}


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest tail of ``text`` that is a proper prefix of ``marker``."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0


class TextStream:
    """Final text in, text safe to send out; ``stopped`` once a stop string is reached (it is never sent)."""

    def __init__(self, stop: Sequence[str] = (), *, hold_tool_calls: bool = False) -> None:
        self.stop = [s for s in stop if s]
        self.hold_tool_calls = hold_tool_calls
        self.text = ""  # everything final so far, cut at a stop string once one is found
        self.sent = 0  # characters of ``text`` already released
        self.stopped = False

    def feed(self, piece: str) -> str:
        """Add final text; return the part that can be sent now."""
        if self.stopped or not piece:
            return ""
        self.text += piece
        cut = min((i for i in (self.text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.text, self.stopped = self.text[:cut], True
        return self._release(final=self.stopped)

    def finish(self) -> str:
        """The rest of the text once generation ended (nothing more can complete a stop string)."""
        return self._release(final=True)

    def _release(self, *, final: bool) -> str:
        end = len(self.text)
        if self.hold_tool_calls:
            at = self.text.find(CALL_OPEN, self.sent)
            if at >= 0:
                end = at  # a call is sent whole at the end (or as text, if it turns out malformed)
            elif not final:
                end -= _partial_suffix(self.text, CALL_OPEN)
        if not final:
            end = min(end, len(self.text) - max((_partial_suffix(self.text, s) for s in self.stop), default=0))
        out = self.text[self.sent:end]
        self.sent = max(self.sent, end)
        return out

    def held(self) -> str:
        """Text not released (a tool call candidate at the end)."""
        return self.text[self.sent:]


@dataclass
class Tally:
    """Usage figures of one request, folded from its events (also when a stop string ended it early)."""

    mode: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    forwards: int = 0
    steps: int = 0
    edits: int = 0
    inserts: int = 0
    deletes: int = 0
    reused: int = 0
    elapsed_s: float = 0.0
    finish: str = "length"
    done: bool = False
    constrained: str | None = None  # the constraint's kind (json_schema, json_object, tool_call) or None

    def update(self, ev: Event) -> None:
        if isinstance(ev, StartEvent):
            self.prompt_tokens, self.reused = ev.prompt_tokens, ev.reused
            self.mode = str(ev.config.get("mode", ""))
        elif isinstance(ev, StepEvent):
            self.forwards, self.elapsed_s = ev.forwards, ev.elapsed_s
            self.steps += 1
            self.edits += len(ev.edited)
            self.inserts += len(ev.inserted)
            self.deletes += len(ev.deleted)
        elif isinstance(ev, BlockEvent):
            self.completion_tokens += len(ev.ids)
            self.forwards, self.elapsed_s = ev.forwards, ev.elapsed_s
        elif isinstance(ev, DoneEvent):
            self.completion_tokens, self.forwards, self.steps = len(ev.ids), ev.forwards, ev.steps
            self.edits, self.elapsed_s, self.reused = ev.edits, ev.elapsed_s, ev.reused
            self.inserts, self.deletes = ev.inserts, ev.deletes
            self.finish, self.done = FINISH.get(ev.finish_reason, "stop"), True

    def usage(self) -> dict[str, Any]:
        tpf = self.completion_tokens / self.forwards if self.forwards else 0.0
        tps = self.completion_tokens / self.elapsed_s if self.elapsed_s > 0 else 0.0
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens,
                "dllm": {"mode": self.mode, "forwards": self.forwards, "tokens_per_forward": round(tpf, 4),
                         "edits": self.edits, "inserts": self.inserts, "deletes": self.deletes, "steps": self.steps, "reused_prompt_tokens": self.reused,
                         "constrained": self.constrained,
                         "elapsed_s": round(self.elapsed_s, 4), "tokens_per_second": round(tps, 2)}}


@dataclass
class Outcome:
    """The end of a request: content, parsed tool calls (if any), finish reason."""

    content: str
    tool_calls: list[dict[str, Any]] | None
    finish_reason: str


def conclude(stream: TextStream, tally: Tally) -> tuple[Outcome, str]:
    """The request's outcome, and the text still to send to a streaming client.

    A held ``<tool_call>`` tail that parses becomes ``tool_calls`` (text around the calls stays content); one
    that does not is sent as plain text.
    """
    rest = stream.finish()
    held = stream.held()
    stream.sent = len(stream.text)
    parsed = parse_tool_calls(held) if held else None
    if parsed is None:
        return Outcome(stream.text, None, "stop" if stream.stopped else tally.finish), rest + held
    extra, calls = parsed
    return Outcome(stream.text[:len(stream.text) - len(held)] + extra, calls, "tool_calls"), rest + extra
