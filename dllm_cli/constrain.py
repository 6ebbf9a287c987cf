"""Compile what a user asks for (a JSON Schema, a regex, a tool-call format) into a decoding ``Constraint``.

Front ends call ``json_schema``, ``regex`` or ``tool_calls`` with the loaded model; the result goes to
``decoding.generate(..., constraint=...)``. The vocabulary is the model's tokens as raw bytes: llama.cpp's
``llama_token_to_piece`` undoes GPT-2 byte-level BPE (``Ġ`` -> space, one byte per symbol), so a character split
over several tokens is several byte strings, which outlines-core's byte-level automaton takes as they are.
Control tokens (role markers, the mask, LLaDA2.2's DELETE/SPLIT) are never text; the model's stop ids (EOS and
end-of-turn) end the answer. Compiled automata are cached in ``$DLLM_HOME/constraints``.
"""
from __future__ import annotations

import ctypes
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Sequence

from dllm_cli.decoding.automaton import Vocab, compile_regex, vocab_from_pieces
from dllm_cli.decoding.guided import Constraint
from dllm_cli.decoding.schema import JSON_OBJECT, load_schema, schema_regex
from dllm_cli.errors import UsageError, clip
from dllm_cli.registry import dllm_home

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
MAX_CALLS = 4  # parallel tool calls in one answer (bounded, so a call list always has to close)


class VocabSource(Protocol):
    """What ``model_vocab`` reads: a loaded ``runtime.Model`` (or a test double)."""

    n_vocab: int
    mask_id: int

    @property
    def stop_ids(self) -> tuple[int, ...]: ...

    @property
    def edit_ids(self) -> tuple[int, int] | None: ...

    def piece_bytes(self, token: int) -> bytes: ...


def cache_dir() -> Path:
    return dllm_home() / "constraints"


def model_vocab(model: VocabSource) -> Vocab:
    """The model's tokens as byte strings (control, mask and edit tokens: ``None``) and its stop ids."""
    never = {int(model.mask_id), *(model.edit_ids or ())}
    pieces = [None if i in never else model.piece_bytes(i) or None for i in range(model.n_vocab)]
    return vocab_from_pieces(pieces, model.stop_ids)


def read_schema_arg(value: str) -> Any:
    """``--json-schema FILE_OR_JSON``: inline JSON when it starts with ``{`` (or is ``true``), else a file path."""
    text = value.strip()
    if text.startswith("{") or text in ("true", "false"):
        return load_schema(text)
    path = Path(value).expanduser()
    try:
        return load_schema(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"--json-schema: no such file {clip(value)}", "pass a schema file or inline JSON") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"--json-schema: cannot read {clip(value)} ({type(e).__name__})",
                         "pass a readable UTF-8 file") from None


def json_schema(vocab: Vocab, schema: Any) -> Constraint:
    """Answers that are JSON valid under ``schema`` (``UsageError`` naming an unsupported keyword)."""
    regex = schema_regex(schema)
    return Constraint("json_schema", json.dumps(schema), compile_regex(regex, vocab, cache_dir=cache_dir()))


def json_object(vocab: Vocab) -> Constraint:
    """Any JSON object (``response_format: json_object``)."""
    return Constraint("json_object", "{}", compile_regex(schema_regex(JSON_OBJECT), vocab, cache_dir=cache_dir()))


def regex(vocab: Vocab, pattern: str) -> Constraint:
    """Answers that ``re.fullmatch`` ``pattern`` (leading ``^`` / trailing ``$`` are implied)."""
    req = request(regex_arg=pattern)
    assert req is not None
    return Constraint("regex", pattern, compile_regex(req.regex, vocab, cache_dir=cache_dir()))


def tool_calls(vocab: Vocab, tools: Sequence[dict[str, Any]], choice: str | None) -> Constraint:
    """``<tool_call>`` blocks of the chat template: ``choice`` ``"required"`` or a tool's name -> one or more
    calls (of that tool); ``"auto"`` -> plain text without ``<tool_call>``, or calls. ``arguments`` must be valid
    against the tool's ``parameters``."""
    by_name = {t["function"]["name"]: t["function"].get("parameters") or {"type": "object"} for t in tools}
    names = list(by_name) if choice in ("required", "auto") else [str(choice)]
    if any(n not in by_name for n in names):
        raise UsageError(f"tool_choice names {clip(names[0])}, which is not in tools", "name one of the tools")
    schema = {"anyOf": [{"type": "object", "properties": {"name": {"const": n}, "arguments": by_name[n]},
                         "required": ["name", "arguments"]} for n in names]}
    one = re.escape(CALL_OPEN + "\n") + schema_regex(schema) + re.escape("\n" + CALL_CLOSE)
    calls = f"{one}(\\n{one}){{0,{MAX_CALLS - 1}}}"
    pattern = f"({without(CALL_OPEN)}|{calls})" if choice == "auto" else calls
    return Constraint("tool_call", json.dumps({"tools": names, "choice": choice}),
                      compile_regex(pattern, vocab, cache_dir=cache_dir()))


def without(word: str) -> str:
    """A regex of the strings that do not contain ``word`` (whose first character occurs nowhere else in it).

    The automaton of "no occurrence" (Knuth-Morris-Pratt with a trivial failure function) written as a regex:
    runs of ``word[0]`` with a proper prefix of the rest (``T``), each followed by a character that breaks the
    match, and any such run at the end.
    """
    first, rest = word[0], word[1:]
    if first in rest:
        raise ValueError(f"{word!r}: the first character repeats")
    f = re.escape(first)

    def breaks(k: int) -> str:  # after first + rest[:k]: a character that is neither rest[k] nor `first`
        alt = f"[^{f}{re.escape(rest[k])}]"
        return alt if k == len(rest) - 1 else f"(?:{alt}|{re.escape(rest[k])}{breaks(k + 1)})"

    prefix = ""
    for ch in reversed(rest[:-1]):
        prefix = f"(?:{re.escape(ch)}{prefix})?"
    T = f"(?:{f}+{prefix})"
    return f"(?:[^{f}]|{T}*{f}+{breaks(0)})*{T}*"


def runtime_piece_bytes(model: Any, token: int) -> bytes:
    """One token's bytes through ``llama_token_to_piece`` (control tokens give ``b""``)."""
    buf = ctypes.create_string_buffer(256)
    n = model.rt.lib.llama_token_to_piece(model.vocab, int(token), buf, len(buf), 0, False)
    if n < 0:
        buf = ctypes.create_string_buffer(-n)
        n = model.rt.lib.llama_token_to_piece(model.vocab, int(token), buf, len(buf), 0, False)
    return buf.raw[:max(n, 0)]


@dataclass(frozen=True)
class Request:
    """A constraint as asked for, checked (schema keywords, regex syntax) before any model is loaded."""

    kind: str  # "json_schema" | "regex"
    source: str  # the schema as JSON text, or the pattern
    regex: str


def request(json_schema_arg: str | None = None, regex_arg: str | None = None, *, what: str = "--json-schema",
            schema: Any = None) -> Request | None:
    """``--json-schema`` / ``--regex`` (at most one) -> a checked ``Request``; ``schema`` passes a parsed one."""
    if json_schema_arg is not None and regex_arg is not None:
        raise UsageError("--json-schema and --regex cannot be combined", "pick one")
    if json_schema_arg is not None or schema is not None:
        parsed = read_schema_arg(json_schema_arg) if json_schema_arg is not None else schema
        return Request("json_schema", json.dumps(parsed, ensure_ascii=False), schema_regex(parsed))
    if regex_arg is not None:
        try:
            re.compile(regex_arg)
        except re.error as e:
            raise UsageError(f"--regex is not a valid regular expression: {e}", "fix the pattern") from None
        body = regex_arg[1:] if regex_arg.startswith("^") else regex_arg
        body = body[:-1] if body.endswith("$") and not body.endswith("\\$") else body
        return Request("regex", regex_arg, body)
    return None


def build(model: VocabSource, req: Request | None) -> Constraint | None:
    """Compile ``req`` over ``model``'s vocabulary (cached); None passes through."""
    if req is None:
        return None
    return Constraint(req.kind, req.source, compile_regex(req.regex, model_vocab(model), cache_dir=cache_dir()))
