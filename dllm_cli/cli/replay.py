"""Trace replay: read a ``dllm run --trace`` JSONL file back into events, paced like the original run.

A trace line is ``event.to_dict()``; step lines may also carry ``"pieces": {"id": "text"}`` for token ids the
trace has not spelled out before (``trace_record`` writes them), so the replay can draw token text without
the model. Ids never spelled out render as ``⟨id⟩``.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from dllm_cli.decoding.events import BlockEvent, DoneEvent, Event, StepEvent, event_from_dict
from dllm_cli.errors import UsageError

MAX_GAP_S = 1.0  # longest pause replayed between two steps (a slow first prefill should not stall the show)


@dataclass
class Trace:
    events: list[Event]
    pieces: dict[int, str] = field(default_factory=dict)


def trace_record(ev: Event, piece: Callable[[int], str] | None, seen: set[int]) -> dict:
    """``ev.to_dict()`` plus, for a step, the text of ids not yet in ``seen`` (updated in place)."""
    d = ev.to_dict()
    if piece is not None and isinstance(ev, StepEvent):
        ids = set(ev.canvas) | {old for _pos, old, _new in ev.edited}
        fresh = sorted(ids - seen)
        if fresh:
            d["pieces"] = {str(i): piece(i) for i in fresh}
            seen.update(fresh)
    return d


def read_trace(path: Path) -> Trace:
    """Parse a JSONL trace; a malformed line is a UsageError naming the line."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise UsageError(f"cannot read trace {path}: {e.strerror}", "write one with `dllm run --trace FILE`") from None
    events: list[Event] = []
    pieces: dict[int, str] = {}
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
            events.append(event_from_dict(d))
            pieces.update({int(k): str(v) for k, v in (d.get("pieces") or {}).items()})
        except (ValueError, KeyError, TypeError) as e:
            raise UsageError(f"{path}:{n} is not a dllm trace event ({type(e).__name__}: {e})",
                             "write one with `dllm run --trace FILE`") from None
    if not events:
        raise UsageError(f"{path} holds no events", "write one with `dllm run --trace FILE`")
    return Trace(events, pieces)


def _stamp(ev: Event) -> float | None:
    return ev.elapsed_s if isinstance(ev, (StepEvent, BlockEvent, DoneEvent)) else None


def paced(events: list[Event], speed: float, *, sleep: Callable[[float], None] = time.sleep) -> Iterator[Event]:
    """Yield ``events`` with the original gaps between them divided by ``speed`` (0 = no pauses)."""
    if speed < 0:
        raise UsageError(f"--speed must not be negative, got {speed}")
    last: float | None = None
    for ev in events:
        t = _stamp(ev)
        if speed > 0 and t is not None and last is not None and t > last:
            sleep(min(t - last, MAX_GAP_S) / speed)
        if t is not None:
            last = t
        elif ev.kind == "start":
            last = 0.0
        yield ev
