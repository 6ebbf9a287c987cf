"""What the worker runs: a request's prompt and knobs in, decoding events out.

``ModelBackend`` drives one loaded model with ``--parallel`` slots through the public library (``decode_config``,
the chat template, the engine) and the batching scheduler (``runtime.scheduler``); each slot keeps the KV cache
of its last request, so a request that extends a cached conversation prefills only its new tokens. ``prepare``
(template, tokenizer, decode config, compiled constraint) runs on the worker's preparation thread, never on the
model's, and stops tokenizing as soon as the prompt cannot fit the context. Tests inject any object with the
``Backend`` methods (a scripted event stream) instead.
"""
from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Protocol

import numpy as np

from dllm_cli.decoding.config import with_overrides
from dllm_cli.decoding.events import Event, StartEvent, StepEvent
from dllm_cli.errors import ContextFullError
from dllm_cli.serve.errors import bad_request, shutting_down
from dllm_cli.serve.validate import ContextInfo

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
    constraint: Any = None  # a serve.constrain.ConstraintSpec: the answer's format (compiled by prepare)


@dataclass(frozen=True)
class Prepared:
    """A request ready for the model: its prompt's token ids and decode config (``Any``: test doubles)."""

    spec: GenerationSpec
    ids: list[int]
    config: Any = None
    constraint: Any = None  # decoding.guided.Constraint, None for free text


class Backend(Protocol):
    """The generation function the worker owns. ``prepare`` runs on the preparation thread (it must only read the
    model: template, tokenizer); ``generate`` on the request's slot thread, ``cancelled`` telling whether the
    request has ended (client gone, timeout, server stopping); every other method on the model's thread.

    Optional: ``slots`` (how many requests it decodes at once), ``choose_slot(job, free)``, ``pump(timeout)``
    (one scheduler tick) and ``slot_info()`` (``[{"slot", "prefix_tokens"}]`` for /health)."""

    model_id: str
    context: ContextInfo

    def prepare(self, spec: GenerationSpec, stopping: Callable[[], bool]) -> Prepared: ...

    def generate(self, job: Prepared, slot: int, cancelled: Callable[[], bool]) -> Iterator[Event]: ...

    def step_view(self, ev: StepEvent) -> dict[str, Any]: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class ServerDefaults:
    """Decode settings of ``dllm serve``'s command line; a request's fields override them."""

    mode: str = "quality"
    overrides: dict[str, Any] = field(default_factory=dict)  # None values are dropped
    max_post_steps_cap: int | None = None  # the ceiling also holds for a preset's value (another mode's preset)

    def for_request(self, spec: GenerationSpec) -> tuple[str, dict[str, Any]]:
        """(mode, overrides) of a request: a mode other than the server's drops the server's preset knobs."""
        mode = spec.mode or self.mode
        base = {k: v for k, v in self.overrides.items() if v is not None}
        if mode != self.mode:
            base = {k: v for k, v in base.items() if k not in PRESET_KNOBS}
        return mode, {**base, **spec.overrides}


def special_chunks(text: str, specials: re.Pattern[str] | None) -> list[str]:
    """``text`` cut right after each special-token text that is followed by a non-space character.

    llama.cpp's special-token parsing rescans every text fragment for every special token, which takes seconds
    on a prompt of thousands of messages; tokenizing these chunks one by one gives the same ids (it tokenizes the
    text between special tokens on its own anyway; a cut never falls before whitespace a token could strip) in
    time linear in the prompt, and lets the caller stop as soon as the context is full.
    """
    if specials is None:
        return [text]
    cuts = [m.end() for m in specials.finditer(text) if m.end() < len(text) and not text[m.end()].isspace()]
    return [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)]) if b > a]


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
    that slot (when free) and prefills only its new tokens. ``context.n_ctx`` is per slot."""

    def __init__(self, name: str | None, options: Any, defaults: ServerDefaults, parallel: int = 1) -> None:
        from dllm_cli.registry import resolve_model
        from dllm_cli.runtime.batch import BatchContext
        from dllm_cli.runtime.model import Model
        from dllm_cli.runtime.scheduler import Scheduler

        self.model = model = Model(resolve_model(name), options)
        try:
            self.ctx = BatchContext(model, options, n_seq=parallel)
        except BaseException:
            model.close()
            raise
        self.scheduler = Scheduler(self.ctx)
        self.slots = parallel
        self.defaults = defaults
        self.model_id = model.path.stem
        self._pieces: dict[int, str] = {}
        self._local = threading.local()  # the StartEvent of the request on this slot thread
        text_of, vocab = model.rt.lib.llama_vocab_get_text, model.vocab  # bytes >= characters: a safe bound
        longest = max((len(text_of(vocab, t) or b"") for t in range(model.n_vocab)), default=1)
        self.context = ContextInfo(n_ctx=int(self.ctx.n_ctx), block_length=int(model.block_length),
                                   max_token_chars=max(1, longest))
        self.refused = {model.mask_id} | set(model.edit_ids or ())  # decoding's own tokens: never in a prompt
        texts = sorted(model.special_texts, key=len, reverse=True)
        self.specials = re.compile("|".join(map(re.escape, texts))) if texts else None
        self._vocab: Any = None
        self._compiled: dict[str, Any] = {}  # regex -> Constraint, the most recent MAX_COMPILED

    @property
    def kv_bytes_per_slot(self) -> int:
        return self.ctx.kv_bytes_per_seq

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
                self._vocab = model_vocab(self.model)
            got = Constraint(spec.kind, spec.regex, compile_regex(spec.regex, self._vocab, cache_dir=cache_dir()))
        self._compiled[spec.regex] = got
        while len(self._compiled) > MAX_COMPILED:
            self._compiled.pop(next(iter(self._compiled)))
        return got

    def prepare(self, spec: GenerationSpec, stopping: Callable[[], bool]) -> Prepared:
        """Decode config, then the prompt's ids, tokenized piece by piece: stops at ``n_ctx`` tokens
        (``ContextFullError``) or when ``stopping()`` turns true (503)."""
        from dllm_cli.generate import decode_config, prompt_ids

        model, n_ctx = self.model, self.context.n_ctx
        mode, overrides = self.defaults.for_request(spec)
        config = decode_config(model, mode, **overrides)
        cap = self.defaults.max_post_steps_cap
        if cap is not None and config.max_post_steps > cap:
            config = with_overrides(config, max_post_steps=cap)
        count = 0

        def tokenize(text: str, special: bool) -> list[int]:
            nonlocal count
            if len(text) > (n_ctx - count) * self.context.max_token_chars:
                raise ContextFullError(f"the prompt cannot fit this server's context of {n_ctx} tokens: "
                                       f"{len(text)} more characters, at most {self.context.max_token_chars} a "
                                       "token", "shorten the prompt")
            ids: list[int] = []
            for chunk in special_chunks(text, self.specials) if special else [text]:
                if stopping():
                    raise shutting_down()
                ids += model.tokenize(chunk, special=special)
                if count + len(ids) >= n_ctx:
                    raise ContextFullError(f"the prompt has at least {count + len(ids)} tokens but this server's "
                                           f"context holds {n_ctx}", "shorten the prompt")
            count += len(ids)
            return ids

        if spec.messages is None:  # raw: special tokens parsed, as ``prompt_ids(..., raw=True)`` does
            ids = tokenize(spec.prompt or "", True)
            bad = next((t for t in ids if t in self.refused), None)
            if bad is not None:
                raise bad_request(f"prompt: holds the decoder's own token {self.piece(bad)!r} (id {bad}), which "
                                  "marks a slot to fill, not text: remove it", "prompt")
        elif model.chat_template is None:
            ids = prompt_ids(model, spec.messages)  # raises the ModelError that says the file has no template
        else:
            ids = model.chat_template.token_ids(spec.messages, tokenize, model.special_texts, True)
        # compiled here, on the preparation thread (the only one that touches the cache), never on the model's
        return Prepared(spec, ids, config, self.constraint(spec.constraint))

    def choose_slot(self, job: Prepared, free: list[int]) -> int:
        """The free slot whose cached prefix shares the most whole blocks with the prompt; else the lowest."""
        ids, B = job.ids, self.ctx.block_length

        def shared(slot: int) -> int:
            cached, n = self.ctx.cached[slot], 0
            while n < min(len(cached), len(ids)) and cached[n] == ids[n]:
                n += 1
            return n // B

        return max(free, key=lambda s: (shared(s), -s))

    def generate(self, job: Prepared, slot: int = 0,
                 cancelled: Callable[[], bool] = lambda: False) -> Iterator[Event]:
        from dllm_cli.decoding import engine
        from dllm_cli.generate import fit_context

        with self.scheduler.attached(slot, cancelled) as model:
            config = fit_context(model, len(job.ids), job.config)  # type: ignore[arg-type]
            rng = np.random.default_rng(config.seed)
            for ev in engine.generate(model, job.ids, config, rng=rng, detokenize=self.model.detokenize,
                                      constraint=job.constraint):
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
