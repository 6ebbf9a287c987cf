"""Frozen, JSON-serialisable events yielded by ``engine.generate`` (style rule 2).

A run yields ``StartEvent``, then per step a ``StepEvent``, per finalized block a ``BlockEvent``, and finally one
``DoneEvent`` (alias ``GenerationResult``). ``to_dict()`` / ``event_from_dict()`` round-trip every event, so a
``--trace`` JSONL file replays the live view without a model: the canvas ids of each step, the positions that
changed, and the finalized text.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar


def _listify(v: Any) -> Any:
    if isinstance(v, (tuple, list)):
        return [_listify(x) for x in v]
    if isinstance(v, dict):
        return {k: _listify(x) for k, x in v.items()}
    return v


def _tupleify(v: Any) -> Any:
    return tuple(_tupleify(x) for x in v) if isinstance(v, list) else v


class _Event:
    kind: ClassVar[str] = ""

    def to_dict(self) -> dict[str, Any]:
        """``{"event": kind, **fields}`` with tuples as lists (``json.dumps`` ready)."""
        return {"event": self.kind, **_listify(asdict(self))}  # type: ignore[call-overload]


@dataclass(frozen=True)
class StartEvent(_Event):
    """Canvas layout of the run. ``reused`` = prompt tokens whose K/V were kept from the previous call."""

    kind: ClassVar[str] = "start"
    prompt_tokens: int
    reused: int
    block_length: int
    mask_id: int
    first_block: int  # floor(P / B): the block holding the prompt tail and the first generation slot
    n_blocks: int  # canvas blocks, ceil((P + max_tokens) / B)
    config: dict[str, Any]


@dataclass(frozen=True)
class StepEvent(_Event):
    """One refinement forward of the active block.

    ``canvas`` holds the ids at absolute positions ``start .. start+len-1`` after this step: the active block,
    or with multi-block editing the whole editable window (then ``start`` is the window start). Positions in
    ``unmasked`` and ``edited`` are relative to ``start`` and index ``canvas``; ``probs`` lists unmasked first,
    then edited, deleted and inserted.

    LLaDA2.2 Levenshtein steps also delete and insert (``dllm_cli.decoding.levenshtein``): ``deleted`` holds
    ``(before, after, old id)``, the position in the block before the shift and where the gap closed in
    ``canvas``; ``inserted`` holds ``(before, after)``, the token before which a mask slot was opened and that
    slot's position in ``canvas``; ``truncated`` the ids pushed past the block end. Unmasked and edited
    positions are after the shift.
    """

    kind: ClassVar[str] = "step"
    block: int
    step: int
    start: int
    canvas: tuple[int, ...]
    unmasked: tuple[int, ...]
    edited: tuple[tuple[int, int, int], ...]  # (position, old id, new id)
    probs: tuple[float, ...]
    forwards: int  # cumulative refinement forwards (commits counted separately)
    commits: int
    mask_count: int  # masks left in the active block
    elapsed_s: float
    deleted: tuple[tuple[int, int, int], ...] = ()  # (position before the shift, after, old id)
    inserted: tuple[tuple[int, int], ...] = ()  # (position before the shift, new mask slot after it)
    truncated: tuple[int, ...] = ()  # ids pushed past the block end by inserts


@dataclass(frozen=True)
class BlockEvent(_Event):
    """A block became final: its output ids and the newly final text (incomplete UTF-8 held back)."""

    kind: ClassVar[str] = "block"
    block: int
    ids: tuple[int, ...]
    text: str
    forwards: int
    elapsed_s: float


@dataclass(frozen=True)
class DoneEvent(_Event):
    """Summary of the run; ``ids`` are cut after the first stop id (kept), ``tpf`` = len(ids) / forwards.

    ``edits`` counts T2T substitutions; ``inserts`` and ``deletes`` LLaDA2.2's INSERT and DELETE edits.
    """

    kind: ClassVar[str] = "done"
    ids: tuple[int, ...]
    text: str
    prompt_tokens: int
    finish_reason: str  # "eos" | "length"
    forwards: int
    commits: int
    steps: int
    edits: int
    tpf: float
    elapsed_s: float
    reused: int = 0
    inserts: int = 0
    deletes: int = 0


GenerationResult = DoneEvent
Event = StartEvent | StepEvent | BlockEvent | DoneEvent
_KINDS: dict[str, type] = {c.kind: c for c in (StartEvent, StepEvent, BlockEvent, DoneEvent)}


def event_from_dict(d: dict[str, Any]) -> Event:
    """Inverse of ``to_dict()`` (trace replay)."""
    cls = _KINDS[d["event"]]
    kw = {f.name: (d[f.name] if f.name == "config" else _tupleify(d[f.name])) for f in fields(cls) if f.name in d}
    return cls(**kw)
