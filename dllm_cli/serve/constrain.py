"""``response_format`` and forced tool calls -> the regex a request's answer must match (checked before queueing).

* ``{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}``: JSON valid under ``schema`` (always
  strict: the decoder cannot write anything else);
* ``{"type": "json_object"}``: any JSON object; ``{"type": "text"}``: no constraint;
* ``tools`` with ``tool_choice`` ``"required"`` or a named function: one or more ``<tool_call>`` blocks of the
  chat template, ``name`` one of the (named) tools and ``arguments`` valid under its ``parameters``; ``"auto"``
  (the default with tools): plain text without ``<tool_call>`` (or the ``response_format`` answer), or calls.

Every schema is checked here (``decoding.schema``), so an unsupported keyword is an HTTP 400 naming it before
the request waits in the queue; the worker compiles the regex over the model's vocabulary (``ConstraintSpec``).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from dllm_cli.constrain import CALL_CLOSE, CALL_OPEN, MAX_CALLS, without
from dllm_cli.decoding.schema import JSON_OBJECT, schema_regex
from dllm_cli.errors import UsageError
from dllm_cli.serve.errors import bad_request


@dataclass(frozen=True)
class ConstraintSpec:
    """What the worker compiles: ``kind`` (json_schema, json_object, tool_call) and the answer's regex."""

    kind: str
    regex: str


def _schema_regex(schema: Any, param: str) -> str:
    try:
        return schema_regex(schema)
    except UsageError as e:
        raise bad_request(f"{param}: {e.message}" + (f" ({e.hint})" if e.hint else ""), param,
                          "unsupported_schema") from None


def response_format_regex(fmt: dict[str, Any] | None) -> tuple[str, str] | None:
    """``(kind, regex)`` of a ``response_format`` (None for text or none); 400 for a malformed one."""
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return "json_object", _schema_regex(JSON_OBJECT, "response_format")
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict) or "schema" not in spec:
            raise bad_request("response_format.json_schema needs a 'schema' object", "response_format.json_schema")
        if not isinstance(spec.get("name", ""), str):
            raise bad_request("response_format.json_schema.name must be a string", "response_format.json_schema.name")
        return "json_schema", _schema_regex(spec["schema"], "response_format.json_schema.schema")
    raise bad_request(f"response_format.type must be text, json_object or json_schema, got {kind!r}",
                      "response_format.type")


def tool_call_regex(tools: list[dict[str, Any]], choice: Any, plain: str | None) -> str:
    """One to ``MAX_CALLS`` calls of the allowed tools; with ``choice`` "auto" also ``plain`` (default: any text
    without ``<tool_call>``)."""
    params = {t["function"]["name"]: t["function"].get("parameters") or {"type": "object"} for t in tools}
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name")
        if name not in params:
            raise bad_request(f"tool_choice names {name!r}, which is not one of the tools", "tool_choice")
        names = [name]
    else:
        names = list(params)
    for i, t in enumerate(tools):  # each schema on its own first, so the 400 names the tool
        _schema_regex(params[t["function"]["name"]], f"tools.{i}.function.parameters")
    schema = {"anyOf": [{"type": "object", "properties": {"name": {"const": n}, "arguments": params[n]},
                         "required": ["name", "arguments"]} for n in names]}
    one = re.escape(CALL_OPEN + "\n") + _schema_regex(schema, "tools") + re.escape("\n" + CALL_CLOSE)
    calls = f"{one}(\\n{one}){{0,{MAX_CALLS - 1}}}"
    if choice in ("required",) or isinstance(choice, dict):
        return calls
    return f"({plain if plain is not None else without(CALL_OPEN)}|{calls})"


def from_request(response_format: dict[str, Any] | None, tools: list[dict[str, Any]] | None = None,
                 tool_choice: Any = None) -> ConstraintSpec | None:
    """The request's constraint, or None when its answer is free text."""
    fmt = response_format_regex(response_format)
    if tools and tool_choice != "none":
        choice = tool_choice if tool_choice is not None else "auto"
        return ConstraintSpec("tool_call", tool_call_regex(tools, choice, fmt[1] if fmt else None))
    if fmt is None:
        return None
    return ConstraintSpec(*fmt)


def describe(spec: ConstraintSpec | None) -> str | None:
    """``usage.dllm.constrained``: the constraint's kind, or None."""
    return spec.kind if spec is not None else None

