"""OpenAI request bodies -> ``GenerationSpec`` (what the worker runs), and the response shapes of both APIs."""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

from dllm_cli.serve.backend import GenerationSpec
from dllm_cli.serve.completion import Outcome
from dllm_cli.serve.errors import bad_request
from dllm_cli.serve import constrain
from dllm_cli.serve.schemas import ChatRequest, CompletionRequest, Message, NamedToolChoice, _Sampling
from dllm_cli.serve.tools import template_messages

MAX_STOPS = 4  # as OpenAI


def _overrides(body: _Sampling, max_tokens: int | None) -> dict[str, Any]:
    if body.n != 1:
        raise bad_request(f"n={body.n} is not supported: dllm returns one choice per request (n=1)", "n",
                          "unsupported_value")
    stops = body.stop_list()
    if len(stops) > MAX_STOPS:
        raise bad_request(f"at most {MAX_STOPS} stop strings are allowed, got {len(stops)}", "stop")
    d = body.dllm
    values = {"max_tokens": max_tokens, "temperature": body.temperature, "top_p": body.top_p, "seed": body.seed,
              "threshold": d.threshold, "editing_threshold": d.editing_threshold,
              "max_post_steps": d.max_post_steps, "editing": d.editing, "indel": d.indel, "block_length": d.block_length,
              "top_k": d.top_k}
    return {k: v for k, v in values.items() if v is not None}


def _text(m: Message, i: int) -> str:
    if m.content is None or isinstance(m.content, str):
        return m.content or ""
    parts = []
    for part in m.content:
        if part.type != "text" or part.text is None:
            raise bad_request(f"content part of type {part.type!r} is not supported: only text",
                              f"messages.{i}.content")
        parts.append(part.text)
    return "".join(parts)


def chat_spec(body: ChatRequest) -> GenerationSpec:
    """Messages through the LLaDA2 tool conventions into template-ready messages, plus decode overrides."""
    messages = []
    for i, m in enumerate(body.messages):
        role = "system" if m.role == "developer" else m.role
        calls = [c.model_dump() for c in m.tool_calls or []]
        messages.append({"role": role, "content": _text(m, i), "tool_calls": calls})
    if body.messages[-1].role == "assistant":
        raise bad_request("the last message is the assistant's: end with a user or tool message", "messages")
    use_tools = bool(body.tools) and body.tool_choice != "none"
    tools = [t.model_dump(exclude_none=True) for t in body.tools or []] if use_tools else None
    max_tokens = body.max_completion_tokens or body.max_tokens
    choice = body.tool_choice.model_dump() if isinstance(body.tool_choice, NamedToolChoice) else body.tool_choice
    return GenerationSpec(messages=template_messages(messages, tools), mode=body.dllm.mode,
                          overrides=_overrides(body, max_tokens), events=body.dllm.events,
                          constraint=constrain.from_request(body.response_format, tools, choice))


def completion_spec(body: CompletionRequest) -> GenerationSpec:
    prompt = body.prompt
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise bad_request("prompt must be one string (batches of prompts are not supported)", "prompt")
        prompt = prompt[0]
    if body.echo:
        raise bad_request("echo is not supported", "echo")
    return GenerationSpec(prompt=prompt, mode=body.dllm.mode, overrides=_overrides(body, body.max_tokens),
                          events=body.dllm.events, constraint=constrain.from_request(body.response_format))


@dataclass
class Shape:
    """How one API names its objects and puts text in a choice (chat ``message``/``delta`` or ``text``)."""

    chat: bool
    model: str
    id: str = ""
    created: int = 0

    def __post_init__(self) -> None:
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": None}

    def response(self, outcome: Outcome, usage: dict[str, Any]) -> dict[str, Any]:
        """The non-streaming body."""
        if self.chat:
            msg: dict[str, Any] = {"role": "assistant", "content": outcome.content or None}
            if outcome.tool_calls:
                msg["tool_calls"] = outcome.tool_calls
            else:
                msg["content"] = outcome.content
            choice = {"index": 0, "message": msg, "logprobs": None, "finish_reason": outcome.finish_reason}
            return {**self._head("chat.completion"), "choices": [choice], "usage": usage}
        choice = {"index": 0, "text": outcome.content, "logprobs": None, "finish_reason": outcome.finish_reason}
        return {**self._head("text_completion"), "choices": [choice], "usage": usage}

    def chunk(self, *, text: str | None = None, role: bool = False, tool_calls: list[dict[str, Any]] | None = None,
              finish: str | None = None) -> dict[str, Any]:
        """One streamed chunk: a text delta, the opening role, tool calls, or the finish reason."""
        if not self.chat:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            return {**self._head("text_completion"), "choices": [choice]}
        delta: dict[str, Any] = {}
        if role:
            delta["role"] = "assistant"
            delta["content"] = ""
        if text:
            delta["content"] = text
        if tool_calls:
            delta["tool_calls"] = [{"index": i, **c} for i, c in enumerate(tool_calls)]
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return {**self._head("chat.completion.chunk"), "choices": [choice]}

    def usage_chunk(self, usage: dict[str, Any]) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self._head(obj), "choices": [], "usage": usage}
