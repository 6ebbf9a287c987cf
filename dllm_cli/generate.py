"""Library entry points: load a model, build a prompt, stream typed decoding events.

The CLI front ends (run, chat, bench) all consume ``stream_generate``'s event stream.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Generator

import numpy as np

from dllm_cli.decoding import engine
from dllm_cli.decoding.config import DecodeConfig, make_config, with_overrides
from dllm_cli.decoding.events import DoneEvent, Event
from dllm_cli.decoding.guided import Constraint
from dllm_cli.errors import ContextFullError, ModelError, UsageError
from dllm_cli.registry import resolve_model
from dllm_cli.runtime.model import Model
from dllm_cli.runtime.options import RuntimeOptions
from dllm_cli.runtime.session import Session


@dataclass
class Loaded:
    """A model and its decoding session (the KV prefix lives in the session across calls)."""

    model: Model
    session: Session

    def close(self) -> None:
        self.session.close()
        self.model.close()


def load(name: str | None = None, options: RuntimeOptions | None = None) -> Loaded:
    """Resolve ``name`` (path, alias, $DLLM_MODEL or the embedded demo) and open a session on it."""
    model = Model(resolve_model(name), options or RuntimeOptions())
    try:
        return Loaded(model, Session(model, options))
    except BaseException:
        model.close()
        raise


def decode_config(model: Model, mode: str, **overrides: Any) -> DecodeConfig:
    """Config from the GGUF's presets for ``mode`` plus explicit overrides; stops on EOS and end-of-turn."""
    overrides.setdefault("stop_ids", model.stop_ids)
    routing = model.routing_block  # LLaDA2.2: pools span whole routing blocks, so decode blocks must tile them
    block = overrides.get("block_length")
    if routing and block and block % routing:
        raise UsageError(f"--block-length {block}: this LLaDA2.2 model routes experts per {routing}-token block",
                         f"use a multiple of {routing}")
    return make_config(mode, model.version, model.presets, **overrides)


def prompt_ids(model: Model, messages: list[dict[str, str]], *, raw: bool = False) -> list[int]:
    """Token ids of a conversation through the chat template, or, with ``raw``, of the messages' text as is.

    Through the template only the template's own markers become control tokens: ``<|mask|>`` or
    ``<|role_end|>`` typed in any message (user, system, assistant, file, stdin) stays ordinary text.
    ``raw`` is the escape hatch for hand-built prompts: the text is tokenized with special tokens parsed.
    """
    if raw:
        text = "".join(m["content"] for m in messages)
        if not text.strip():
            raise UsageError("the prompt is empty", "pass a prompt argument, --file, or pipe text on stdin")
        return check_prompt(model, model.tokenize(text, special=True), raw=True)
    return check_prompt(model, model.chat_ids(messages, add_generation_prompt=True), raw=False)


def check_prompt(model: Model, ids: list[int], *, raw: bool) -> list[int]:
    """``ids``, unless they hold a token the decoder owns (the mask token; LLaDA2.2's DELETE/SPLIT): the model
    would treat it as a slot to fill, and decoding would never converge. UsageError for a ``--raw`` prompt,
    ModelError (naming the file) when the chat template put it there."""
    owned = {model.mask_id, *(model.edit_ids or ())}
    at = next((n for n, i in enumerate(ids) if i in owned), None)
    if at is None:
        return ids
    tok = ids[at]
    what = f"{'the mask token' if tok == model.mask_id else 'the editing token'} {model.piece(tok)!r} (id {tok})"
    if raw:
        raise UsageError(f"the prompt holds {what} at token {at}: the decoder fills that token in, so a prompt "
                         "cannot contain it", "remove it from the --raw prompt, or drop --raw to send it as text")
    raise ModelError(f"the chat template of {model.path} puts {what} into the prompt",
                     "the template is tokenizer.chat_template inside the GGUF: re-convert the model")


def fit_context(session: Session, n_prompt: int, config: DecodeConfig) -> DecodeConfig:
    """Refuse a prompt that cannot fit the context; cap ``max_tokens`` to the room that is left."""
    ubatch, block = getattr(session, "n_ubatch", None), getattr(session, "block_length", None)
    if ubatch and block and (config.mbe + 1) * block > ubatch:  # the window is decoded in one batch
        raise UsageError(f"--mbe {config.mbe} needs windows of {(config.mbe + 1) * block} tokens, but this "
                         f"context decodes at most {ubatch} at once", f"use --mbe {max(0, ubatch // block - 1)} or less")
    room = session.n_ctx - n_prompt
    if room < 1:
        raise ContextFullError(f"the prompt has {n_prompt} tokens but the context holds {session.n_ctx}",
                               "raise --ctx-size or shorten the prompt")
    return config if config.max_tokens <= room else with_overrides(config, max_tokens=room)


def stream_generate(loaded: Loaded, ids: list[int], config: DecodeConfig,
                    constraint: Constraint | None = None) -> Generator[Event, None, None]:
    """Decode ``ids`` with ``config``, yielding typed step events (the KV prefix is reused when it matches);
    ``constraint`` (``dllm_cli.constrain``) keeps the answer inside a JSON Schema, regex or tool-call format."""
    config = fit_context(loaded.session, len(ids), config)
    rng = np.random.default_rng(config.seed)
    yield from engine.generate(loaded.session, ids, config, rng=rng, detokenize=loaded.model.detokenize,
                               constraint=constraint)


def generate(loaded: Loaded, ids: list[int], config: DecodeConfig,
             constraint: Constraint | None = None) -> DoneEvent:
    """Run to completion and return the summary event."""
    done = None
    for ev in stream_generate(loaded, ids, config, constraint):
        if isinstance(ev, DoneEvent):
            done = ev
    assert done is not None
    return done
