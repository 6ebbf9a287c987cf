"""Rich renderables for the live diffusion view, built purely from decoding events (no model, no I/O).

``LiveView`` folds ``StartEvent``/``StepEvent``/``BlockEvent``/``DoneEvent`` into a small state and renders:

    finalized text of this answer (plain, the tail that fits the screen)
    the active block as a row of cells:  masks ``░`` (dim), tokens unmasked this step (green),
                                         tokens edited this step ``old→new`` (struck red → bold yellow),
                                         LLaDA2.2: a deleted token struck out where the row closed up,
                                         an inserted mask slot ``▓`` (magenta) between its neighbours;
                                         edits, deletes and inserts of the last ``EDIT_LINGER_S`` fainter
    a status line: mode · block · step · forwards · tokens/forward · edits · tokens/s

Updating is O(block length) per step and rendering is string building, so the view never slows the model;
the command decides how often to refresh.
"""
from __future__ import annotations

from typing import Callable, Iterable

from rich.console import Console, ConsoleOptions, RenderResult
from rich.text import Text

from dllm_cli.decoding.events import BlockEvent, DoneEvent, Event, StartEvent, StepEvent
from dllm_cli.printable import printable

MASK_CELL = "░"
MASK_STYLE = "grey42"
NEW_STYLE = "bold black on green3"
EDIT_OLD_STYLE = "strike red"
EDIT_NEW_STYLE = "bold black on yellow"
RECENT_OLD_STYLE = "strike grey50"
RECENT_NEW_STYLE = "yellow"
DELETE_STYLE = "strike bold red"
RECENT_DELETE_STYLE = "strike grey50"
INSERT_CELL = "▓"
INSERT_STYLE = "bold magenta"
RECENT_INSERT_STYLE = "magenta"
EDIT_LINGER_S = 0.5  # an edit stays drawn as old→new this long (decode time), so eyes can catch fast steps
STATUS_STYLE = "grey62"

Piece = Callable[[int], str]


def id_piece(token: int) -> str:
    """Fallback token rendering when no vocabulary is at hand (a trace without pieces)."""
    return f"⟨{token}⟩"


def visible(piece: str) -> str:
    """A token's text for one cell: control characters made visible (``printable``: an ESC in a token is drawn
    ``␛``, never sent to the terminal) so a row stays one row, and special tokens
    short (a finished block is mostly ``<|endoftext|>`` padding: ``␄``; ``<|role_end|>`` -> ``‹role_end›``)."""
    if piece.startswith("<|") and piece.endswith("|>") and len(piece) > 4:
        return "␄" if piece == "<|endoftext|>" else f"‹{piece[2:-2]}›"
    return printable(piece.replace("\n", "↵").replace("\r", "").replace("\t", "⇥"), lines=False) or "∅"


class PieceCache:
    """Memoised ``piece(id)`` (the live view asks for the same ids every step)."""

    def __init__(self, piece: Piece | None = None, table: dict[int, str] | None = None) -> None:
        self._piece = piece
        self.table: dict[int, str] = dict(table or {})

    def __call__(self, token: int) -> str:
        text = self.table.get(token)
        if text is None:
            text = self._piece(token) if self._piece else id_piece(token)
            self.table[token] = text
        return text


class LiveView:
    """State of one answer being decoded, and its rendering (a Rich renderable)."""

    def __init__(self, piece: Piece | None = None, *, mode: str = "", max_text_lines: int | None = None) -> None:
        self.piece = piece if isinstance(piece, PieceCache) else PieceCache(piece)
        self.mode = mode
        self.max_text_lines = max_text_lines
        self.reset()

    def reset(self) -> None:
        self.text = ""  # finalized text of this answer
        self.mask_id = -1
        self.stops: frozenset[int] = frozenset()  # stop ids: cells after the first one are padding, not output
        self.prompt_tokens = 0
        self.first_block = 0
        self.n_blocks = 0
        self.block = 0
        self.step = 0  # forwards of the active block so far (engine steps count from 0)
        self.start = 0
        self.canvas: tuple[int, ...] = ()
        self.unmasked: frozenset[int] = frozenset()
        self.edited: dict[int, int] = {}  # relative position -> old id (edited this step)
        self.recent: dict[int, tuple[int, float]] = {}  # absolute position -> (old id, elapsed_s of the edit)
        self.ghosts: list[tuple[int, int, float]] = []  # deleted tokens: (absolute gap position, old id, elapsed_s)
        self.slots: dict[int, float] = {}  # inserted mask slots: absolute position -> elapsed_s of the insert
        self.inserts = 0
        self.deletes = 0
        self.forwards = 0
        self.edits = 0
        self.final_tokens = 0  # tokens in finalized blocks
        self.elapsed_s = 0.0
        self.reused = 0
        self.done: DoneEvent | None = None

    # --- folding events ------------------------------------------------------------------
    def update(self, ev: Event) -> None:
        """Fold one event into the view state (cheap: no rendering here)."""
        if isinstance(ev, StartEvent):
            mode = self.mode or str(ev.config.get("mode", ""))
            self.reset()
            self.mode = mode
            self.mask_id, self.prompt_tokens, self.reused = ev.mask_id, ev.prompt_tokens, ev.reused
            self.stops = frozenset(int(t) for t in ev.config.get("stop_ids", ()))
            self.first_block, self.n_blocks, self.block = ev.first_block, ev.n_blocks, ev.first_block
            self.start = ev.first_block * ev.block_length
            self.canvas = (ev.mask_id,) * ev.block_length
        elif isinstance(ev, StepEvent):
            self.block, self.step, self.start, self.canvas = ev.block, ev.step + 1, ev.start, ev.canvas
            self.unmasked = frozenset(ev.unmasked)
            self.edited = {pos: old for pos, old, _new in ev.edited}
            self.forwards, self.elapsed_s = ev.forwards, ev.elapsed_s
            if ev.deleted or ev.inserted:
                self._shift(ev)
            for pos, old, _new in ev.edited:
                self.recent[ev.start + pos] = (old, ev.elapsed_s)
            self.edits += len(ev.edited)
            self.inserts += len(ev.inserted)
            self.deletes += len(ev.deleted)
        elif isinstance(ev, BlockEvent):
            self.text += ev.text
            self.final_tokens += len(ev.ids)
            self.forwards, self.elapsed_s = ev.forwards, ev.elapsed_s
            self.canvas, self.unmasked, self.edited, self.recent = (), frozenset(), {}, {}
            self.ghosts, self.slots = [], {}
            self.block = ev.block + 1
            self.step = 0
        elif isinstance(ev, DoneEvent):
            self.done = ev
            self.forwards, self.elapsed_s, self.edits = ev.forwards, ev.elapsed_s, ev.edits
            self.inserts, self.deletes = ev.inserts, ev.deletes
            self.canvas, self.unmasked, self.edited = (), frozenset(), {}

    def _shift(self, ev: StepEvent) -> None:
        """Move the lingering marks with the row after a delete/insert, then add this step's own."""
        deleted = sorted(b for b, _a, _o in ev.deleted)
        inserted = sorted(b for b, _a in ev.inserted)

        def moved(abs_pos: int) -> int | None:  # where the cell at abs_pos went (None: deleted or pushed out)
            b = abs_pos - ev.start
            if not 0 <= b < len(ev.canvas):
                return abs_pos  # the gap after the last cell stays at the end
            if b in deleted:
                return None
            a = b - sum(d < b for d in deleted) + sum(i <= b for i in inserted)
            return ev.start + a if a < len(ev.canvas) else None

        self.recent = {q: v for p, v in self.recent.items() if (q := moved(p)) is not None}
        self.slots = {q: t for p, t in self.slots.items() if (q := moved(p)) is not None}
        ghosts = [(ev.start + a, old, ev.elapsed_s) for _b, a, old in ev.deleted]
        for gap, old, t in self.ghosts:  # a gap sits before the cell that followed it; it moves with that cell
            q = moved(gap)
            ghosts.append((q if q is not None else gap, old, t))
        self.ghosts = ghosts
        for _b, a in ev.inserted:
            self.slots[ev.start + a] = ev.elapsed_s

    def picture(self) -> tuple[object, ...]:
        """What the view draws, less the status line's running numbers: two states with equal pictures look the
        same but for counters, so chat's pacing (``cli/pace.py``) holds a frame only when this changes."""
        return (len(self.text), self.block, self.step, self.canvas, self.unmasked,
                tuple(sorted(self.edited.items())), tuple(self.ghosts), tuple(sorted(self.slots.items())),
                self.done is not None)

    def feed(self, events: Iterable[Event]) -> "LiveView":
        for ev in events:
            self.update(ev)
        return self

    # --- numbers ---------------------------------------------------------------------------
    def _is_prompt(self, rel: int) -> bool:
        return self.start + rel < self.prompt_tokens

    @property
    def decoded_in_block(self) -> int:
        """Decoded cells of the active block up to and including the first stop id (the rest is padding)."""
        n = 0
        for i, t in enumerate(self.canvas):
            if t == self.mask_id or self._is_prompt(i):
                continue
            n += 1
            if t in self.stops:
                break
        return n

    @property
    def tokens(self) -> int:
        """Generated tokens so far: finalized blocks plus decoded cells of the active block."""
        if self.done is not None:
            return len(self.done.ids)
        return self.final_tokens + self.decoded_in_block

    @property
    def tpf(self) -> float:
        return self.tokens / self.forwards if self.forwards else 0.0

    @property
    def tps(self) -> float:
        return self.tokens / self.elapsed_s if self.elapsed_s > 0 else 0.0

    # --- rendering -------------------------------------------------------------------------
    def block_row(self) -> Text:
        """The active block as a row of cells, read left to right like the text it becomes.

        Token cells carry their own spacing (pieces start with a space where words do); prompt-tail positions
        of the first block are left out.
        """
        row = Text(no_wrap=False, overflow="fold")
        ghosts: dict[int, list[tuple[int, float]]] = {}
        for gap, gone, t in self.ghosts:
            if self.elapsed_s - t <= EDIT_LINGER_S:
                ghosts.setdefault(gap - self.start, []).append((gone, t))
        for i, tok in enumerate(self.canvas):
            for gone, t in ghosts.get(i, ()):
                row.append(visible(self.piece(gone)), style=DELETE_STYLE if t == self.elapsed_s else RECENT_DELETE_STYLE)
            if self._is_prompt(i):
                continue
            if tok == self.mask_id:
                slot = self.slots.get(self.start + i)
                if slot is not None and self.elapsed_s - slot <= EDIT_LINGER_S:
                    row.append(INSERT_CELL, style=INSERT_STYLE if slot == self.elapsed_s else RECENT_INSERT_STYLE)
                else:
                    row.append(MASK_CELL, style=MASK_STYLE)
                continue
            cell = visible(self.piece(tok))
            old = self.edited.get(i)
            recent = self.recent.get(self.start + i)
            if old is not None:
                row.append(visible(self.piece(old)), style=EDIT_OLD_STYLE)
                row.append("→", style="yellow")
                row.append(cell, style=EDIT_NEW_STYLE)
            elif recent is not None and self.elapsed_s - recent[1] <= EDIT_LINGER_S and recent[0] != tok:
                row.append(visible(self.piece(recent[0])), style=RECENT_OLD_STYLE)
                row.append("→", style=RECENT_NEW_STYLE)
                row.append(cell, style=RECENT_NEW_STYLE)
            elif i in self.unmasked:
                row.append(cell, style=NEW_STYLE)
            else:
                row.append(cell)
        for gone, t in ghosts.get(len(self.canvas), ()):  # deleted at the end of the row
            row.append(visible(self.piece(gone)), style=DELETE_STYLE if t == self.elapsed_s else RECENT_DELETE_STYLE)
        return row

    def status_line(self) -> Text:
        """``speed · block 2/5 · step 3 · 17 fwd · 2.41 tok/fwd · 4 edits · 88.1 tok/s``."""
        if not self.forwards and self.done is None:  # before the first step: the prefill
            what = (f"{self.prompt_tokens} prompt tokens, {self.reused} cached" if self.prompt_tokens
                    else "reading the prompt")
            return Text(f"{self.mode or '?'} · {what}", style=STATUS_STYLE)
        total = max(self.n_blocks - self.first_block, 0)
        parts = [self.mode or "?"]
        if total:
            parts.append(f"block {min(self.block - self.first_block + 1, total)}/{total}")
        parts += [f"step {self.step}", f"{self.forwards} fwd", f"{self.tpf:.2f} tok/fwd",
                  f"{self.edits} edit{'s' if self.edits != 1 else ''}"]
        if self.inserts or self.deletes:
            parts.append(f"{self.inserts} ins · {self.deletes} del")
        parts.append(f"{self.tps:.1f} tok/s")
        if self.reused:
            parts.append(f"{self.reused} cached")
        return Text(" · ".join(parts), style=STATUS_STYLE)

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        width = options.max_width
        budget = self.max_text_lines
        if budget is None:
            budget = max((options.height or console.size.height) - 6, 1)
        if self.text:
            text = self.text[:-1] if self.text.endswith("\n") else self.text  # the row below starts a line anyway
            lines = Text(printable(text)).wrap(console, width)
            yield from lines[-budget:] if len(lines) > budget else lines
        if self.canvas:
            yield self.block_row()
        yield self.status_line()


def summary_line(done: DoneEvent, mode: str = "") -> str:
    """One line of stats after an answer: tokens, forwards, tok/fwd, edits, tok/s, reused prompt tokens."""
    tps = len(done.ids) / done.elapsed_s if done.elapsed_s > 0 else 0.0
    bits = [mode] if mode else []
    bits += [f"{len(done.ids)} tokens", f"{done.forwards} fwd", f"{done.tpf:.2f} tok/fwd",
             f"{done.edits} edit{'s' if done.edits != 1 else ''}"]
    if done.inserts or done.deletes:
        bits.append(f"{done.inserts} ins · {done.deletes} del")
    bits += [f"{tps:.1f} tok/s", f"{done.elapsed_s:.2f}s"]
    if done.reused:
        bits.append(f"{done.reused} prompt tokens cached")
    if done.finish_reason == "length":
        bits.append("stopped at max tokens")
    return " · ".join(bits)
