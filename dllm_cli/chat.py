"""Conversation state for ``dllm chat``: messages, transcript, settings, save, retry, clear (no Rich, no I/O
besides ``save``).

``Conversation`` is the transcript (pure data). ``Chat`` binds one to a loaded model: it builds the prompt
through the chat template, streams decoding events, records each answer (an interrupted one is kept, marked
``interrupted``) and leaves the session's KV cache consistent whatever stops a turn. The engine reuses the
longest block-aligned prefix of the cache that matches the next prompt, so turn N+1 only prefills its new
tokens.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Generator, Iterator

from dllm_cli.decoding.config import DecodeConfig, with_overrides
from dllm_cli.decoding.events import BlockEvent, DoneEvent, Event, StartEvent
from dllm_cli import domains, outfiles
from dllm_cli.errors import UsageError, clip
from dllm_cli.registry import MODES

# Knobs ``/set`` accepts, with how to read their value. Mode presets own the first five (``/mode`` resets them).
SETTINGS: dict[str, type] = {
    "threshold": float, "editing_threshold": float, "max_post_steps": int, "editing": bool, "indel": bool,
    "temperature": float, "top_k": int, "top_p": float, "seed": int, "max_tokens": int, "block_length": int,
}
PRESET_KNOBS = ("threshold", "editing_threshold", "max_post_steps", "editing", "indel")
_TRUE, _FALSE = {"1", "true", "on", "yes"}, {"0", "false", "off", "no"}


@dataclass
class Turn:
    """One message of the transcript; assistant turns carry stats and may be ``interrupted``."""

    role: str  # "user" | "assistant"
    content: str
    interrupted: bool = False
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass
class Conversation:
    """The transcript of a chat: an optional system prompt and alternating user/assistant turns."""

    system: str | None = None
    turns: list[Turn] = field(default_factory=list)

    def messages(self) -> list[dict[str, str]]:
        """Messages for the chat template (an interrupted answer is kept as far as it got)."""
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + [{"role": t.role, "content": t.content} for t in self.turns]

    def add_user(self, text: str) -> None:
        self.turns.append(Turn("user", text))

    def add_answer(self, text: str, *, interrupted: bool = False, stats: dict[str, Any] | None = None) -> Turn:
        turn = Turn("assistant", text, interrupted, dict(stats or {}))
        self.turns.append(turn)
        return turn

    def pop_for_retry(self) -> str:
        """Drop the last answer (if any) and the user turn before it; return that user text to ask again."""
        turns = self.turns
        if turns and turns[-1].role == "assistant":
            turns.pop()
        if not turns or turns[-1].role != "user":
            raise UsageError("nothing to retry yet", "ask something first")
        return turns.pop().content

    def clear(self) -> None:
        """Forget every turn (the system prompt stays)."""
        self.turns.clear()

    # --- export ------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {"system": self.system, "turns": [asdict(t) for t in self.turns]}

    def to_markdown(self) -> str:
        out = ["# dllm chat", ""]
        if self.system:
            out += ["**System:** " + self.system, ""]
        for t in self.turns:
            if t.role == "user":
                out += ["## User", "", t.content, ""]
                continue
            out += ["## Assistant" + (" (interrupted)" if t.interrupted else ""), "", t.content, ""]
            if t.stats:
                out += ["<!-- " + ", ".join(f"{k}={v}" for k, v in t.stats.items()) + " -->", ""]
        return "\n".join(out).rstrip("\n") + "\n"

    def save(self, path: str | Path) -> Path:
        """Write the transcript as Markdown (``.md``) or JSON (``.json``), atomically (``.part`` + rename).

        A path that cannot be written is an ``OutputError`` naming it; nothing is left behind.
        """
        path = outfiles.expand(path)
        suffix = path.suffix.lower()
        if suffix in (".md", ".markdown"):
            data = self.to_markdown()
        elif suffix == ".json":
            data = json.dumps(self.to_json(), ensure_ascii=False, indent=1) + "\n"
        else:
            raise UsageError(f"cannot save as {clip(path.name)}", "use a .md or .json file name")
        return outfiles.write_text(path, data, what="the transcript")


def parse_setting(name: str, text: str) -> tuple[str, Any]:
    """``("threshold", "0.6")`` -> ``("threshold", 0.6)``; unknown names and values outside the option's domain
    (``dllm_cli.domains``, the table ``--threshold`` and friends use) are UsageErrors."""
    key = name.strip().lower().replace("-", "_")
    kind = SETTINGS.get(key)
    if kind is None:
        raise UsageError(f"unknown setting {clip(name)}", "settings: " + ", ".join(SETTINGS))
    raw = text.strip()
    if kind is bool:
        if raw.lower() not in _TRUE | _FALSE:
            raise UsageError(f"{key} takes on/off, got {clip(raw)}")
        return key, raw.lower() in _TRUE
    if key in ("seed", "block_length") and raw.lower() in ("none", "off", "default"):
        return key, None
    return key, domains.parse(key, raw)


class Chat:
    """A conversation bound to a loaded model (``generate.Loaded``) and a decode config."""

    def __init__(self, loaded: Any, config: DecodeConfig, *, system: str | None = None,
                 overrides: dict[str, Any] | None = None) -> None:
        self.loaded = loaded
        self.config = config
        self.overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
        self.conversation = Conversation(system=system)
        self.last_prefill_s: float | None = None  # last turn: seconds from the request to a prefilled prompt
        self.constraint: Any = None  # a decoding.guided.Constraint while /set schema or /set regex is on
        self.constraint_label = "off"

    def set_constraint(self, kind: str, value: str) -> str:
        """``/set schema FILE_OR_JSON`` / ``/set regex PATTERN`` (``off`` for either removes it): compiled over the
        model's vocabulary now, so a bad schema is refused here (UsageError) and the constraint is unchanged."""
        from dllm_cli import constrain

        value = value.strip()
        if value.lower() in ("off", "none"):
            self.constraint, self.constraint_label = None, "off"
            return "schema=off"
        req = constrain.request(value, None) if kind == "schema" else constrain.request(None, value)
        self.constraint = constrain.build(self.loaded.model, req)
        self.constraint_label = f"{kind} {clip(value, 40, quote=False)}"
        return f"{kind}={clip(value, 60, quote=False)}"

    # --- settings ------------------------------------------------------------------------------
    def set_mode(self, mode: str) -> DecodeConfig:
        """Switch preset; the mode's thresholds replace any set by hand, other knobs are kept."""
        from dllm_cli.generate import decode_config

        if mode not in MODES:
            raise UsageError(f"unknown mode {clip(mode)}", "use /mode " + "|".join(MODES))
        for k in PRESET_KNOBS:
            self.overrides.pop(k, None)
        self.config = decode_config(self.loaded.model, mode, **self.overrides)
        return self.config

    def set(self, name: str, value: str) -> DecodeConfig:
        """``/set NAME VALUE``: validated; on a bad value the config is unchanged and a UsageError says why."""
        key, parsed = parse_setting(name, value)
        self.config = with_overrides(self.config, **{key: parsed})
        self.overrides[key] = parsed
        return self.config

    def settings(self) -> dict[str, Any]:
        return {**{f.name: getattr(self.config, f.name) for f in fields(DecodeConfig)
                   if f.name in SETTINGS or f.name == "mode"}, "schema": self.constraint_label}

    # --- turns ---------------------------------------------------------------------------------
    def clear(self) -> None:
        """Forget the conversation and drop the KV cache."""
        self.conversation.clear()
        self.loaded.session.reset()

    def ask(self, text: str) -> Iterator[Event]:
        """Add a user turn and stream the answer's events; the answer joins the transcript when done."""
        self.conversation.add_user(text)
        yield from self._answer()

    def retry(self) -> Iterator[Event]:
        """Ask the last question again (its previous answer is dropped)."""
        text = self.conversation.pop_for_retry()
        yield from self.ask(text)

    def prompt(self) -> list[int]:
        """Token ids of the whole conversation so far, through the model's chat template."""
        from dllm_cli.generate import prompt_ids

        return prompt_ids(self.loaded.model, self.conversation.messages())

    def stream(self, ids: list[int]) -> Generator[Event, None, None]:
        """Decoding events for ``ids`` (the engine reuses the session's matching KV prefix)."""
        from dllm_cli.generate import stream_generate

        return stream_generate(self.loaded, ids, self.config, self.constraint)

    def _answer(self) -> Iterator[Event]:
        parts: list[str] = []
        self.last_prefill_s = None
        try:
            ids = self.prompt()
            t0 = time.perf_counter()
            for ev in self.stream(ids):
                if isinstance(ev, StartEvent):  # the engine yields it once the prompt's new blocks are in the cache
                    self.last_prefill_s = time.perf_counter() - t0
                if isinstance(ev, BlockEvent):
                    parts.append(ev.text)
                elif isinstance(ev, DoneEvent):
                    self.conversation.add_answer(ev.text, stats=answer_stats(ev, self.config.mode))
                yield ev
        except (KeyboardInterrupt, GeneratorExit):
            if self.conversation.turns[-1].role == "user":
                self.conversation.add_answer("".join(parts), interrupted=True)
            self.repair()
            raise
        except BaseException:
            if self.conversation.turns[-1].role == "user":
                self.conversation.turns.pop()
            self.repair()
            raise

    def repair(self) -> None:
        """Make the KV cache match ``session.cached`` again after a turn stopped half-way.

        Committed blocks stay (the next prompt reuses whatever prefix still matches); cells a stopped step
        or commit left behind are removed.
        """
        session = self.loaded.session
        if getattr(session, "ctx", True):  # a closed session has nothing to repair
            session.rollback(len(session.cached))


def answer_stats(done: DoneEvent, mode: str) -> dict[str, Any]:
    """The per-answer numbers kept in the transcript."""
    tps = len(done.ids) / done.elapsed_s if done.elapsed_s > 0 else 0.0
    return {"mode": mode, "tokens": len(done.ids), "forwards": done.forwards, "tpf": round(done.tpf, 3),
            "edits": done.edits, "tok_s": round(tps, 1), "seconds": round(done.elapsed_s, 3),
            "finish": done.finish_reason, "reused_prompt_tokens": done.reused}


def prefix_reuse_benchmark(loaded: Any, config: DecodeConfig, questions: list[str], *, system: str | None = None,
                           repeats: int = 3) -> dict[str, Any]:
    """Prefill time of the last turn of a conversation: warm (KV prefix kept from the earlier turns) vs cold.

    Each repeat replays the conversation from an empty cache, timing the last question's prefill (request to
    ``StartEvent``) with the prefix reused; then empties the cache and times the same prompt again, cold.
    """
    warm: list[float] = []
    cold: list[float] = []
    reused, n_prompt = 0, 0
    for _ in range(repeats):
        chat = Chat(loaded, config, system=system)
        chat.clear()
        for q in questions:
            for _ev in chat.ask(q):
                pass
        assert chat.last_prefill_s is not None  # set at the StartEvent, which the engine always yields first
        warm.append(chat.last_prefill_s)
        reused = chat.conversation.turns[-1].stats["reused_prompt_tokens"]
        chat.conversation.turns.pop()  # back to the last question, to prefill it cold
        ids = chat.prompt()
        n_prompt = len(ids)
        loaded.session.reset()
        t0 = time.perf_counter()
        events = chat.stream(ids)
        next(iter(events))  # StartEvent: the whole prompt is prefilled
        cold.append(time.perf_counter() - t0)
        events.close()
        chat.repair()
    best = min
    return {"turns": len(questions), "prompt_tokens": n_prompt, "reused_tokens": reused,
            "warm_prefill_s": best(warm), "cold_prefill_s": best(cold),
            "speedup": best(cold) / best(warm) if best(warm) else None, "repeats": repeats}
