"""Trace replay: read a ``dllm run --trace`` JSONL file back into events, paced like the original run.

A trace line is ``event.to_dict()``; step lines may also carry ``"pieces": {"id": "text"}`` for token ids the
trace has not spelled out before (``trace_record`` writes them), so the replay can draw token text without
the model. Ids never spelled out render as ``⟨id⟩``.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterator

from dllm_cli import domains
from dllm_cli.decoding.events import _KINDS, BlockEvent, DoneEvent, Event, StepEvent, event_from_dict
from dllm_cli.errors import UsageError, clip
from dllm_cli.outfiles import read_reason

MAX_GAP_S = 1.0  # longest pause replayed between two steps (a slow first prefill should not stall the show)


@dataclass
class Trace:
    events: list[Event]
    pieces: dict[int, str] = field(default_factory=dict)


def trace_record(ev: Event, piece: Callable[[int], str] | None, seen: set[int]) -> dict:
    """``ev.to_dict()`` plus, for a step, the text of ids not yet in ``seen`` (updated in place)."""
    d = ev.to_dict()
    if piece is not None and isinstance(ev, StepEvent):
        ids = set(ev.canvas) | {old for _pos, old, _new in ev.edited} | {old for _b, _a, old in ev.deleted} \
            | set(ev.truncated)
        fresh = sorted(ids - seen)
        if fresh:
            d["pieces"] = {str(i): piece(i) for i in fresh}
            seen.update(fresh)
    return d


MAX_ID = 2**31 - 1
MAX_LINE = 64 * 2**20  # bytes in one trace line (a step of a 1M-token window is ~10 MB)
MAX_ITEMS = 1 << 20  # ids in one canvas; a longer list is not a trace dllm wrote
_INT_CAPS = {"block_length": 65536, "n_blocks": 1 << 24}


def _int_problem(name: str, v: Any, lo: int = 0) -> str | None:
    hi = _INT_CAPS.get(name, MAX_ID)
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        return f'"{name}" must be an integer in [{lo}, {hi}]'
    return None


def _ids_problem(name: str, v: Any) -> str | None:
    if not isinstance(v, list) or len(v) > MAX_ITEMS:
        return f'"{name}" must be a list of token ids'
    if any(isinstance(x, bool) or not isinstance(x, int) or not 0 <= x <= MAX_ID for x in v):
        return f'"{name}" must hold non-negative integer ids'
    return None


def _field_problem(name: str, kind: str, v: Any) -> str | None:
    """Is ``v`` a valid value of an event field annotated ``kind`` (the annotation's text)?"""
    if kind == "int":
        return _int_problem(name, v, lo=1 if name == "block_length" else 0)
    if kind == "float":
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0
        return None if ok else f'"{name}" must be a non-negative number'
    if kind == "str":
        return None if isinstance(v, str) else f'"{name}" must be a string'
    if kind == "tuple[int, ...]":
        return _ids_problem(name, v)
    if kind == "tuple[float, ...]":
        ok = isinstance(v, list) and all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                         and math.isfinite(x) for x in v)
        return None if ok else f'"{name}" must be a list of numbers'
    for width in (3, 2):  # edited/deleted triples, inserted pairs: all non-negative integers
        if kind.startswith("tuple[tuple[" + ", ".join(["int"] * width) + "]"):
            ok = isinstance(v, list) and all(isinstance(e, list) and len(e) == width and _ids_problem(name, e) is None
                                             for e in v)
            return None if ok else f'"{name}" must be a list of {width}-integer lists'
    if kind.startswith("dict"):
        if not isinstance(v, dict):
            return f'"{name}" must be an object'
        if "mode" in v and not isinstance(v["mode"], str):
            return f'"{name}.mode" must be a string'
        return _ids_problem(f"{name}.stop_ids", v["stop_ids"]) if "stop_ids" in v else None
    return None


def check_event(d: Any) -> str | None:
    """Why ``d`` (one parsed trace line) is not an event ``dllm run --trace`` writes, or None."""
    if not isinstance(d, dict):
        return f"a JSON {type(d).__name__}, not an object"
    kind = d.get("event")
    cls = _KINDS.get(kind) if isinstance(kind, str) else None
    if cls is None:
        return f'"event" must be one of {", ".join(_KINDS)}'
    for f in fields(cls):
        if f.name not in d:
            if f.default is MISSING:
                return f'missing "{f.name}"'
            continue
        problem = _field_problem(f.name, str(f.type), d[f.name])
        if problem:
            return problem
    if cls is StepEvent:  # positions are relative to the canvas
        n = len(d["canvas"])
        after = [p for p in d["unmasked"]] + [e[0] for e in d["edited"]] + [e[1] for e in d.get("inserted", [])]
        if any(p >= n for p in after) or any(e[0] >= n or e[1] > n for e in d.get("deleted", [])):
            return f'a position in "unmasked", "edited", "deleted" or "inserted" is outside the {n}-token canvas'
    pieces = d.get("pieces")
    if pieces is not None and not (isinstance(pieces, dict) and all(
            k.isdigit() and len(k) < 11 and isinstance(v, str) for k, v in pieces.items())):
        return '"pieces" must map token ids to strings'
    return None


def read_trace(path: Path) -> Trace:
    """Parse a JSONL trace; anything malformed is a one-line UsageError naming the file and line."""
    hint = "write one with `dllm run --trace FILE`"
    where = clip(str(path), 200, quote=False)
    events: list[Event] = []
    pieces: dict[int, str] = {}
    try:
        with open(path, "rb") as f:
            for n, raw in enumerate(iter(lambda: f.readline(MAX_LINE + 1), b""), 1):
                if len(raw) > MAX_LINE:  # /dev/zero, a binary file: no line of a trace is this long
                    raise UsageError(f"{where}:{n} is longer than {MAX_LINE // 2**20} MB, not a dllm trace", hint)
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError:
                    raise UsageError(f"{where}:{n} is not UTF-8 text, not a dllm trace", hint) from None
                if not line.strip():
                    continue
                try:
                    d = json.loads(line)
                except ValueError as e:
                    raise UsageError(f"{where}:{n} is not JSON ({getattr(e, 'msg', e)})", hint) from None
                problem = check_event(d)
                if problem:
                    raise UsageError(f"{where}:{n} is not a dllm trace event: {problem}", hint)
                events.append(event_from_dict(d))
                pieces.update({int(k): v for k, v in (d.get("pieces") or {}).items()})
    except OSError as e:
        raise UsageError(f"cannot read trace {where}: {read_reason(e)}", hint) from None
    if not events:
        raise UsageError(f"{where} holds no events", hint)
    return Trace(events, pieces)


def _stamp(ev: Event) -> float | None:
    return ev.elapsed_s if isinstance(ev, (StepEvent, BlockEvent, DoneEvent)) else None


def paced(events: list[Event], speed: float, *, sleep: Callable[[float], None] = time.sleep) -> Iterator[Event]:
    """Yield ``events`` with the original gaps between them divided by ``speed`` (0 = no pauses)."""
    domains.check("speed", speed)
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
