"""What the worker thread runs: a request's prompt and knobs in, decoding events out.

``ModelBackend`` drives one loaded model through the public library (``prompt_ids``, ``decode_config``,
``stream_generate``); its session keeps the KV cache of the last request, so a request that extends a cached
conversation prefills only its new tokens. Tests inject any object with the ``Backend`` methods (a scripted
event stream) instead.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator, Protocol

from dllm_cli.decoding.events import Event, StartEvent, StepEvent

PRESET_KNOBS = ("threshold", "editing_threshold", "max_post_steps", "editing", "indel")
MAX_COMPILED = 32  # compiled constraints kept per model


@dataclass(frozen=True)
class GenerationSpec:
    """One request, validated: chat ``messages`` (template-ready) or a raw ``prompt``, plus decode overrides."""

    messages: list[dict[str, str]] | None = None
    prompt: str | None = None
    mode: str | None = None  # None: the server's default mode
    overrides: dict[str, Any] = field(default_factory=dict)  # DecodeConfig fields set by the request
    events: bool = False  # the client wants step views (``step_view``)
    constraint: Any = None  # a serve.constrain.ConstraintSpec: the answer's format (compiled on the worker)


class Backend(Protocol):
    """The generation function the worker owns; every method runs on the worker thread."""

    model_id: str

    def generate(self, spec: GenerationSpec) -> Iterator[Event]: ...

    def step_view(self, ev: StepEvent) -> dict[str, Any]: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class ServerDefaults:
    """Decode settings of ``dllm serve``'s command line; a request's fields override them."""

    mode: str = "quality"
    overrides: dict[str, Any] = field(default_factory=dict)  # None values are dropped

    def for_request(self, spec: GenerationSpec) -> tuple[str, dict[str, Any]]:
        """(mode, overrides) of a request: a mode other than the server's drops the server's preset knobs."""
        mode = spec.mode or self.mode
        base = {k: v for k, v in self.overrides.items() if v is not None}
        if mode != self.mode:
            base = {k: v for k, v in base.items() if k not in PRESET_KNOBS}
        return mode, {**base, **spec.overrides}


def step_view(ev: StepEvent, prompt_tokens: int, mask_id: int, piece: Any) -> dict[str, Any]:
    """A step as the page draws it: the generated cells of the active block (None = mask), what changed.

    Prompt-tail cells of the first block are left out; ``new``, ``edits`` and ``inserted`` (LLaDA2.2's new mask
    slots) index the cells shown; ``deleted`` holds ``[where the gap closed, old text]``.
    """
    skip = max(0, prompt_tokens - ev.start)
    cells = [None if t == mask_id else piece(t) for t in ev.canvas[skip:]]
    return {"block": ev.block, "step": ev.step, "cells": cells,
            "new": [p - skip for p in ev.unmasked if p >= skip],
            "edits": [[p - skip, piece(old)] for p, old, _new in ev.edited if p >= skip],
            "inserted": [a - skip for _b, a in ev.inserted if a >= skip],
            "deleted": [[a - skip, piece(old)] for _b, a, old in ev.deleted if a >= skip],
            "forwards": ev.forwards, "masks": ev.mask_count, "elapsed_s": round(ev.elapsed_s, 4)}


class ModelBackend:
    """A model loaded with ``generate.load``; create, use and close it on the worker thread only."""

    def __init__(self, name: str | None, options: Any, defaults: ServerDefaults) -> None:
        from dllm_cli.generate import load

        self.loaded = load(name, options)
        self.defaults = defaults
        self.model_id = self.loaded.model.path.stem
        self._pieces: dict[int, str] = {}
        self._start: StartEvent | None = None
        self._vocab: Any = None
        self._compiled: dict[str, Any] = {}  # regex -> Constraint, the most recent MAX_COMPILED

    def constraint(self, spec: Any) -> Any:
        """The compiled ``decoding.guided.Constraint`` of a request's ``ConstraintSpec`` (None: free text).

        The vocabulary is read once per model; compiled automata are kept in memory (and on disk, by
        ``compile_regex``'s cache), so a client repeating its schema pays the compile once.
        """
        if spec is None:
            return None
        from dllm_cli.constrain import cache_dir, model_vocab
        from dllm_cli.decoding.automaton import compile_regex
        from dllm_cli.decoding.guided import Constraint

        got = self._compiled.pop(spec.regex, None)
        if got is None:
            if self._vocab is None:
                self._vocab = model_vocab(self.loaded.model)
            got = Constraint(spec.kind, spec.regex, compile_regex(spec.regex, self._vocab, cache_dir=cache_dir()))
        self._compiled[spec.regex] = got
        while len(self._compiled) > MAX_COMPILED:
            self._compiled.pop(next(iter(self._compiled)))
        return got

    def generate(self, spec: GenerationSpec) -> Iterator[Event]:
        from dllm_cli.generate import decode_config, prompt_ids, stream_generate

        model = self.loaded.model
        mode, overrides = self.defaults.for_request(spec)
        config = decode_config(model, mode, **overrides)
        if spec.messages is not None:
            ids = prompt_ids(model, spec.messages)
        else:
            ids = prompt_ids(model, [{"role": "user", "content": spec.prompt or ""}], raw=True)
        events = stream_generate(self.loaded, ids, config, self.constraint(spec.constraint))
        try:
            for ev in events:
                if isinstance(ev, StartEvent):
                    self._start = ev
                yield ev
        finally:
            events.close()
            self._repair()

    def _repair(self) -> None:
        """After a cancelled request: drop the cells a stopped step or commit left behind (as chat does)."""
        session = self.loaded.session
        if getattr(session, "ctx", None):
            session.rollback(len(session.cached))

    def piece(self, token: int) -> str:
        text = self._pieces.get(token)
        if text is None:
            text = self._pieces[token] = self.loaded.model.piece(token)
        return text

    def step_view(self, ev: StepEvent) -> dict[str, Any]:
        prompt = self._start.prompt_tokens if self._start else 0
        return step_view(ev, prompt, self.loaded.model.mask_id, self.piece)

    def close(self) -> None:
        self.loaded.close()
