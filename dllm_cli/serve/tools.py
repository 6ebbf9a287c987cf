"""Function calling the LLaDA2 way (spec §4, §5.6): tool definitions in the system turn, ``<tool_call>`` JSON out.

The official LLaDA2 / Ling 2.0 chat template puts a tools block after the system prompt, renders an assistant's
calls as ``<tool_call>\\n{"name": ..., "arguments": ...}\\n</tool_call>`` and a run of tool results as one
OBSERVATION turn. ``template_messages`` folds all three into plain ``{"role", "content"}`` messages that render
to the same bytes through that template (and through the embedded demo model's, which has no tools branch), so
requests with tools go through ``generate.prompt_ids`` like any other.
"""
from __future__ import annotations

import json
import re
import uuid
from typing import Any, Iterable

TOOLS_HEADER = ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
                "You are provided with function signatures within <tools></tools> XML tags:\n<tools>")
TOOLS_FOOTER = ("\n</tools>\n\nFor each function call, return a json object with function name and arguments "
                "within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, "
                "\"arguments\": <args-json-object>}\n</tool_call>\n")
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
_RESULT_JOIN = "\n</tool_response>\n<tool_response>\n"  # between the results of one OBSERVATION turn


def tools_block(tools: Iterable[dict[str, Any]]) -> str:
    """The template's tools block: header, one ``tojson`` line per tool, instructions (ends with a newline)."""
    return TOOLS_HEADER + "".join("\n" + json.dumps(t, ensure_ascii=False) for t in tools) + TOOLS_FOOTER


def render_call(name: str, arguments: str) -> str:
    """An assistant's call as the template writes it; ``arguments`` (OpenAI's JSON string) goes in as JSON."""
    try:
        args: Any = json.loads(arguments) if arguments else {}
    except json.JSONDecodeError:
        args = arguments  # not JSON: keep the client's string rather than refuse the conversation
    return CALL_OPEN + "\n" + json.dumps({"name": name, "arguments": args}, ensure_ascii=False) + "\n" + CALL_CLOSE


def template_messages(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> list[dict[str, str]]:
    """``{"role", "content", "tool_calls"?}`` messages -> ``{"role", "content"}`` messages for the chat template.

    The tools block joins the first system message (one is added when there is none): the template writes
    ``content + "\\n"`` there, so the block goes in without its final newline. Consecutive tool results merge
    into one message, as the official template renders them in one OBSERVATION turn.
    """
    out: list[dict[str, str]] = []
    for m in messages:
        role, content = m["role"], m.get("content") or ""
        if role == "assistant" and m.get("tool_calls"):
            for i, call in enumerate(m["tool_calls"]):
                fn = call["function"]
                sep = "" if i == 0 and not content else "\n"
                content += sep + render_call(fn["name"], fn.get("arguments") or "{}")
        if role == "tool" and out and out[-1]["role"] == "tool":
            out[-1]["content"] += _RESULT_JOIN + content
            continue
        out.append({"role": role, "content": content})
    if tools:
        block = tools_block(tools)[:-1]
        if out and out[0]["role"] == "system":
            out[0]["content"] += "\n" + block
        else:
            out.insert(0, {"role": "system", "content": block})
    return out


def parse_tool_calls(text: str) -> tuple[str, list[dict[str, Any]]] | None:
    """``(content, tool_calls)`` when ``text`` holds well-formed ``<tool_call>`` JSON, else None (plain text).

    Each call must be a JSON object with a string ``name``; ``arguments`` (object or JSON string) becomes OpenAI's
    JSON string. One malformed call, or an unclosed tag, makes the whole answer plain text.
    """
    if CALL_OPEN not in text:
        return None
    calls = []
    for body in _CALL.findall(text):
        try:
            obj = json.loads(body)
        except json.JSONDecodeError:
            return None
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
            return None
        args = obj.get("arguments", {})
        if not isinstance(args, str):
            args = json.dumps(args, ensure_ascii=False)
        calls.append({"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
                      "function": {"name": obj["name"], "arguments": args}})
    rest = _CALL.sub("", text)
    if not calls or CALL_OPEN in rest or CALL_CLOSE in rest:
        return None
    return rest.strip(), calls
