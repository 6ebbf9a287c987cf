"""JSON Schema -> regular expression, through outlines-core, refusing what it would silently get wrong.

outlines-core's ``build_regex_from_schema`` ignores keywords it does not know (``minimum``, ``multipleOf``,
``uniqueItems``, ...), turns ``allOf`` into a concatenation and ``oneOf`` into ``anyOf`` (an answer matching two
branches would be invalid), so its regex would accept
JSON the schema rejects. ``schema_regex`` therefore walks the schema first and raises ``UsageError`` naming the
first keyword outside ``SUPPORTED`` (one line, before any decoding: CLI exit 2, HTTP 400). The only rewrite is
bounded integers: ``{"type": "integer", "minimum": a, "maximum": b}`` becomes an ``enum`` of the (at most
``MAX_INT_RANGE``) values, the one bound outlines-core cannot express.

A schema that admits no value (``false``, ``enum: []``, an empty integer range, ``anyOf: []``) is refused too: a
decode under it could never end validly.
"""
from __future__ import annotations

import json
from typing import Any

from dllm_cli.errors import UsageError, clip

MAX_INT_RANGE = 1000  # widest [minimum, maximum] turned into an enum
ANNOTATIONS = frozenset({"title", "description", "default", "examples", "$schema", "$id", "$comment", "deprecated",
                         "readOnly", "writeOnly", "format_hint"})
SUPPORTED = frozenset({"type", "properties", "required", "additionalProperties", "items", "prefixItems",
                       "minItems", "maxItems", "enum", "const", "anyOf", "minLength", "maxLength",
                       "pattern", "format", "$ref", "$defs", "definitions", "minimum", "maximum",
                       "exclusiveMinimum", "exclusiveMaximum", "minDigits", "maxDigits"}) | ANNOTATIONS
_BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")
JSON_OBJECT: dict[str, Any] = {"type": "object"}  # response_format json_object: any JSON object


def load_schema(text: str) -> Any:
    """Parse a schema given as JSON text; a syntax error is a ``UsageError`` naming line and column."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise UsageError(f"the JSON Schema is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})",
                         "pass a schema file or a JSON object") from None


def schema_regex(schema: Any, *, whitespace: str | None = None) -> str:
    """The regex of the JSON texts ``schema`` admits (outlines-core), after ``check_schema``'s rewrite."""
    from outlines_core.json_schema import build_regex_from_schema

    fixed = check_schema(schema)
    try:
        return str(build_regex_from_schema(json.dumps(fixed), whitespace))
    except (ValueError, TypeError, RecursionError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "recusion" in first or "recursion" in first:
            raise UsageError(f"the JSON Schema recurses without bound ({first})",
                             "bound the recursion: give the recursive property a depth-limited definition") from None
        raise UsageError(f"the JSON Schema cannot be compiled: {clip(first, 160, quote=False)}",
                         "use the keywords listed in the README (\"Structured output\")") from None


def check_schema(schema: Any, path: str = "#") -> Any:
    """A copy of ``schema`` with bounded integers as enums; ``UsageError`` for unsupported or empty schemas."""
    if schema is True or schema == {}:
        return {}
    if schema is False:
        raise UsageError(f"the JSON Schema at {path} is `false`: it forbids every value", "remove it")
    if not isinstance(schema, dict):
        raise UsageError(f"the JSON Schema at {path} is a {type(schema).__name__}, not an object",
                         "a schema is a JSON object")
    for key in schema:
        if key not in SUPPORTED:
            raise UsageError(f"unsupported JSON Schema keyword {key!r} at {path}",
                             "remove it: structured output supports " + ", ".join(sorted(SUPPORTED - ANNOTATIONS)))
    out = {k: v for k, v in schema.items() if k not in ANNOTATIONS}
    for key in ("anyOf", "prefixItems"):
        if key in out:
            if not isinstance(out[key], list) or not out[key]:
                raise UsageError(f"{key} at {path} must be a non-empty list", "an empty one forbids every value")
            out[key] = [check_schema(s, f"{path}/{key}/{i}") for i, s in enumerate(out[key])]
    if "enum" in out and (not isinstance(out["enum"], list) or not out["enum"]):
        raise UsageError(f"enum at {path} is empty: it forbids every value", "list at least one value")
    for key in ("properties", "$defs", "definitions"):
        if isinstance(out.get(key), dict):
            out[key] = {name: check_schema(s, f"{path}/{key}/{name}") for name, s in out[key].items()}
    for key in ("items", "additionalProperties"):
        if isinstance(out.get(key), dict):
            out[key] = check_schema(out[key], f"{path}/{key}")
    _check_lengths(out, path)
    if any(b in out for b in _BOUNDS):
        return _int_enum(out, path)
    return out


def _check_lengths(s: dict[str, Any], path: str) -> None:
    for lo, hi in (("minLength", "maxLength"), ("minItems", "maxItems"), ("minDigits", "maxDigits")):
        a, b = s.get(lo), s.get(hi)
        for name, v in ((lo, a), (hi, b)):
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
                raise UsageError(f"{name} at {path} must be a non-negative integer, got {clip(v)}", "fix the schema")
        if a is not None and b is not None and a > b:
            raise UsageError(f"{lo} {a} > {hi} {b} at {path}: it forbids every value", "fix the bounds")


def _int_enum(s: dict[str, Any], path: str) -> dict[str, Any]:
    """``minimum``/``maximum`` (and exclusive forms) on an integer with both ends bounded -> an ``enum``."""
    if s.get("type") != "integer":
        key = next(b for b in _BOUNDS if b in s)
        raise UsageError(f"unsupported JSON Schema keyword {key!r} at {path} (bounds are supported on integers only)",
                         'use "type": "integer" with both bounds, or an enum')
    lo = _bound(s, "minimum", "exclusiveMinimum", path, +1)
    hi = _bound(s, "maximum", "exclusiveMaximum", path, -1)
    if lo is None or hi is None:
        key = "maximum" if hi is None else "minimum"
        raise UsageError(f"integer bounds at {path} need both ends: {key!r} is missing",
                         f"add {key}, at most {MAX_INT_RANGE} values apart")
    if lo > hi:
        raise UsageError(f"the integer range [{lo}, {hi}] at {path} is empty: it forbids every value", "fix the bounds")
    if hi - lo >= MAX_INT_RANGE:
        raise UsageError(f"the integer range [{lo}, {hi}] at {path} is wider than {MAX_INT_RANGE} values",
                         "narrow it or drop the bounds")
    rest = {k: v for k, v in s.items() if k not in _BOUNDS and k != "type"}
    values = [v for v in range(lo, hi + 1) if "enum" not in rest or v in rest["enum"]]
    if not values:
        raise UsageError(f"the integer range at {path} and its enum have no value in common", "fix the schema")
    return {**rest, "enum": values}


def _bound(s: dict[str, Any], inclusive: str, exclusive: str, path: str, step: int) -> int | None:
    """The tightest integer bound from ``inclusive``/``exclusive`` (``step``: +1 for lower, -1 for upper)."""
    import math

    found: list[int] = []
    for key, strict in ((inclusive, False), (exclusive, True)):
        v = s.get(key)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise UsageError(f"{key} at {path} must be a finite number, got {clip(v)}", "fix the schema")
        b = math.ceil(v) if step > 0 else math.floor(v)
        if strict and b == v:
            b += step
        found.append(int(b))
    if not found:
        return None
    return max(found) if step > 0 else min(found)
