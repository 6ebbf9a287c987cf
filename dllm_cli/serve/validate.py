"""A request body from bytes to a checked, typed body before any model work, every failure a 400 naming the field.

The order is the cheap one: JSON, valid Unicode everywhere (a lone surrogate such as ``"\\ud800"`` cannot be
encoded for the tokenizer), strict types and ranges (pydantic), then the server's ceilings and size measures that
need no tokenizer: the number of messages, and the characters of all the text against the context (no prompt of
more than ``n_ctx * longest_token_chars`` characters can fit). Only a request that passes is rendered and
tokenized, off the model's thread (``Worker.prepare``).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, TypeVar

from pydantic import ValidationError

from dllm_cli.domains import DOMAINS
from dllm_cli.serve.errors import ApiError, bad_request
from dllm_cli.serve.schemas import ChatRequest, CompletionRequest, _Body, _Sampling

B = TypeVar("B", bound=_Body)
MIN_TEMPERATURE = float(DOMAINS["temperature"].lo or 0.0)  # the CLI's floor (--temperature, /set): one for all
_TYPE_TAGS = ("str", "int", "float", "bool", "list", "dict", "none", "literal", "function", "json")


@dataclass(frozen=True)
class Ceilings:
    """The most one request may ask for (``dllm serve``'s options); over it is a 400 naming the field."""

    max_tokens: int = 512
    max_post_steps: int = 32
    request_timeout_s: float = 600.0  # a running request ends with finish_reason "length" after this long


@dataclass(frozen=True)
class ContextInfo:
    """What the cheap size checks need from the loaded model."""

    n_ctx: int = 4096
    block_length: int = 32
    max_token_chars: int = 64  # characters of the longest token piece


def _surrogate_at(obj: Any, path: tuple[str, ...] = ()) -> tuple[str, ...] | None:
    """The path of the first string (value or key) holding a lone surrogate, or None."""
    stack: list[tuple[Any, tuple[str, ...]]] = [(obj, path)]
    while stack:
        value, where = stack.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                return where
        elif isinstance(value, dict):
            for k, v in value.items():
                stack.append((k, where + (str(k),)))
                stack.append((v, where + (str(k),)))
        elif isinstance(value, list):
            stack.extend((v, where + (str(i),)) for i, v in enumerate(value))
    return None


def _param(loc: tuple[Any, ...]) -> str | None:
    """pydantic's error location as a request field (``messages.0.role``); union member tags are dropped."""
    parts: list[str] = []
    for p in loc:
        s = str(p)
        if isinstance(p, str) and ("[" in s or s.split("-")[0].lower() in _TYPE_TAGS or s[:1].isupper()):
            break
        parts.append(s)
    return ".".join(parts) or None


def _validation_error(exc: ValidationError) -> ApiError:
    first = exc.errors()[0]
    param = _param(tuple(first.get("loc", ())))
    if first.get("type") == "missing":
        return bad_request(f"missing required field {param!r}", param, "missing_required_parameter")
    if param is None:
        return bad_request("the request body must be a JSON object", None, "invalid_json")
    got = first.get("input")
    shown = json.dumps(got)[:40] if isinstance(got, (str, int, float, bool)) or got is None else type(got).__name__
    return bad_request(f"{param}: {first.get('msg', 'invalid value')} (got {shown})", param)


def parse_body(raw: bytes, model: type[B]) -> B:
    """``raw`` JSON as a ``model`` body; ``ApiError`` 400 for bad JSON, bad Unicode, a wrong type or range."""
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError; RecursionError: absurd nesting
        raise bad_request("the request body is not valid JSON", None, "invalid_json") from None
    if not isinstance(data, dict):
        raise bad_request("the request body must be a JSON object", None, "invalid_json")
    where = _surrogate_at(data)
    if where is not None:
        field = ".".join(where)
        raise bad_request(f"{field}: the text holds a lone UTF-16 surrogate (such as \\ud800), which is not valid "
                          "Unicode: send UTF-8 text", field)
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise _validation_error(e) from None


def _text_chars(body: _Sampling) -> int:
    if isinstance(body, CompletionRequest):
        return sum(len(p) for p in ([body.prompt] if isinstance(body.prompt, str) else body.prompt))
    assert isinstance(body, ChatRequest)
    n = sum(len(m.content) if isinstance(m.content, str) else sum(len(p.text or "") for p in m.content or [])
            for m in body.messages)
    n += sum(len(c.function.arguments) + len(c.function.name) for m in body.messages for c in m.tool_calls or [])
    return n + sum(len(t.model_dump_json()) for t in body.tools or [])


def check_limits(body: _Sampling, ceilings: Ceilings, ctx: ContextInfo) -> None:
    """The server's ceilings and the cheap size measures; ``ApiError`` 400 naming the field."""
    field, asked = (("max_completion_tokens", body.max_completion_tokens)
                    if isinstance(body, ChatRequest) and body.max_completion_tokens is not None
                    else ("max_tokens", body.max_tokens))
    if asked is not None and asked > ceilings.max_tokens:
        raise bad_request(f"{field} {asked} is above this server's limit of {ceilings.max_tokens} tokens "
                          "(dllm serve --max-tokens)", field)
    d = body.dllm
    if d.max_post_steps is not None and d.max_post_steps > ceilings.max_post_steps:
        raise bad_request(f"dllm.max_post_steps {d.max_post_steps} is above this server's limit of "
                          f"{ceilings.max_post_steps} (dllm serve --max-post-steps)", "dllm.max_post_steps")
    if d.block_length is not None and d.block_length != ctx.block_length:
        raise bad_request(f"dllm.block_length {d.block_length}: this model decodes in blocks of {ctx.block_length} "
                          "tokens (its KV cache and attention are laid out per block); omit the field or send "
                          f"{ctx.block_length}", "dllm.block_length")
    if body.temperature is not None and 0 < body.temperature < MIN_TEMPERATURE:
        raise bad_request(f"temperature {body.temperature!r} is too small to sample with: use 0 for greedy "
                          f"decoding or at least {MIN_TEMPERATURE:g}", "temperature")
    prompt = "messages" if isinstance(body, ChatRequest) else "prompt"
    if isinstance(body, CompletionRequest) and isinstance(body.prompt, str) and not body.prompt.strip():
        raise bad_request("prompt is empty: send the text to complete", "prompt")
    if isinstance(body, ChatRequest) and len(body.messages) >= ctx.n_ctx:
        raise ApiError(400, f"{len(body.messages)} messages cannot fit this server's context of {ctx.n_ctx} "
                       "tokens (each message takes at least one)", param=prompt, code="context_length_exceeded")
    chars, most = _text_chars(body), ctx.n_ctx * ctx.max_token_chars
    if chars > most:
        raise ApiError(400, f"the {prompt} ({chars} characters) cannot fit this server's context of {ctx.n_ctx} "
                       f"tokens (at most {ctx.max_token_chars} characters a token): shorten it", param=prompt,
                       code="context_length_exceeded")
