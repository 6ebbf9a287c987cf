"""What the worker runs: a request's prompt and knobs in, decoding events out.

``ModelBackend`` drives one loaded model with ``--parallel`` slots through the public library (``prompt_ids``,
``decode_config``, the engine) and the batching scheduler (``runtime.scheduler``); each slot keeps the KV cache
of its last request, so a request that extends a cached conversation prefills only its new tokens. Tests
inject any object with the ``Backend`` methods (a scripted event stream) instead.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Protocol

import numpy as np

from dllm_cli.decoding.events import Event, StartEvent, StepEvent

PRESET_KNOBS = ("threshold", "editing_threshold", "max_post_steps", "editing", "indel")


@dataclass(frozen=True)
class GenerationSpec:
    """One request, validated: chat ``messages`` (template-ready) or a raw ``prompt``, plus decode overrides."""

    messages: list[dict[str, str]] | None = None
    prompt: str | None = None
    mode: str | None = None  # None: the server's default mode
    overrides: dict[str, Any] = field(default_factory=dict)  # DecodeConfig fields set by the request
    events: bool = False  # the client wants step views (``step_view``)


class Backend(Protocol):
    """The generation function the worker owns. ``generate`` runs on the request's slot thread; everything else
    on the worker's thread. ``cancelled`` tells whether the request's client has gone.

    Optional: ``slots`` (how many requests it decodes at once), ``choose_slot(spec, free)``, ``pump(timeout)``
    (one scheduler tick) and ``slot_info()`` (``[{"slot", "prefix_tokens"}]`` for /health)."""

    model_id: str

    def generate(self, spec: GenerationSpec, slot: int, cancelled: Callable[[], bool]) -> Iterator[Event]: ...

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
    """A model with ``parallel`` slots in one batched context (``runtime.batch``); a request runs on a slot
    and its ``step``/``commit`` calls are batched with the other slots' by the scheduler the worker pumps.
    Each slot keeps the KV prefix of its last request, so a request extending a cached conversation goes to
    that slot (when free) and prefills only its new tokens."""

    def __init__(self, name: str | None, options: Any, defaults: ServerDefaults, parallel: int = 1) -> None:
        from dllm_cli.registry import resolve_model
        from dllm_cli.runtime.batch import BatchContext
        from dllm_cli.runtime.model import Model
        from dllm_cli.runtime.scheduler import Scheduler

        self.model = Model(resolve_model(name), options)
        try:
            self.ctx = BatchContext(self.model, options, n_seq=parallel)
        except BaseException:
            self.model.close()
            raise
        self.scheduler = Scheduler(self.ctx)
        self.slots = parallel
        self.defaults = defaults
        self.model_id = self.model.path.stem
        self._pieces: dict[int, str] = {}
        self._local = threading.local()  # the StartEvent of the request on this slot thread
        self._prepared: dict[int, tuple[GenerationSpec, list[int]]] = {}

    @property
    def kv_bytes_per_slot(self) -> int:
        return self.ctx.kv_bytes_per_seq

    def _ids(self, spec: GenerationSpec) -> list[int]:
        from dllm_cli.generate import prompt_ids

        if spec.messages is not None:
            return prompt_ids(self.model, spec.messages)
        return prompt_ids(self.model, [{"role": "user", "content": spec.prompt or ""}], raw=True)

    def choose_slot(self, spec: GenerationSpec, free: list[int]) -> int:
        """The free slot whose cached prefix shares the most whole blocks with the prompt; else the lowest."""
        ids = self._ids(spec)
        self._prepared[id(spec)] = (spec, ids)
        B = self.ctx.block_length

        def shared(slot: int) -> int:
            cached, n = self.ctx.cached[slot], 0
            while n < min(len(cached), len(ids)) and cached[n] == ids[n]:
                n += 1
            return n // B

        return max(free, key=lambda s: (shared(s), -s))

    def generate(self, spec: GenerationSpec, slot: int = 0,
                 cancelled: Callable[[], bool] = lambda: False) -> Iterator[Event]:
        from dllm_cli.decoding import engine
        from dllm_cli.generate import decode_config, fit_context

        mode, overrides = self.defaults.for_request(spec)
        config = decode_config(self.model, mode, **overrides)
        prepared = self._prepared.pop(id(spec), None)
        ids = prepared[1] if prepared is not None and prepared[0] is spec else self._ids(spec)
        with self.scheduler.attached(slot, cancelled) as model:
            config = fit_context(model, len(ids), config)  # type: ignore[arg-type]
            rng = np.random.default_rng(config.seed)
            for ev in engine.generate(model, ids, config, rng=rng, detokenize=self.model.detokenize):
                if isinstance(ev, StartEvent):
                    self._local.start = ev
                yield ev

    def pump(self, timeout: float) -> bool:
        return self.scheduler.pump(timeout)

    def slot_info(self) -> list[dict[str, Any]]:
        return [{"slot": s, "prefix_tokens": len(c)} for s, c in enumerate(self.ctx.cached)]

    def piece(self, token: int) -> str:
        text = self._pieces.get(token)
        if text is None:
            text = self._pieces[token] = self.model.piece(token)
        return text

    def step_view(self, ev: StepEvent) -> dict[str, Any]:
        start = getattr(self._local, "start", None)
        return step_view(ev, start.prompt_tokens if start else 0, self.model.mask_id, self.piece)

    def close(self) -> None:
        self.scheduler.close()
        self.ctx.close()
        self.model.close()
