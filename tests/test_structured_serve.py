"""``dllm serve`` structured output with the real ``openai`` client on the embedded demo model.

The demo model was never trained for JSON or tools, so every parsed answer here is the constraint's doing:
response_format json_schema / json_object, tool calls with tool_choice required, named and auto, streaming
and not; an unsupported schema is a 400 naming the keyword; running out of max_tokens is finish_reason length.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import jsonschema
import openai
import pytest

from runtime_marks import needs_runtime
from serve_fakes import free_port

pytestmark = needs_runtime
DLLM = str(Path(sys.executable).with_name("dllm"))
SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                           "rank": {"type": "integer", "minimum": 1, "maximum": 10},
                                           "tags": {"type": "array", "items": {"enum": ["big", "été"]},
                                                    "maxItems": 2}},
          "required": ["city", "rank"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
             "type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                              "unit": {"enum": ["c", "f"]}}, "required": ["city", "unit"]}}},
         {"type": "function", "function": {"name": "add", "parameters": {
             "type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                              "b": {"type": "integer", "minimum": 0, "maximum": 99}},
             "required": ["a", "b"]}}}]
PARAMS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
MSG = [{"role": "user", "content": "Describe France."}]


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    logs = tmp_path_factory.mktemp("serve")
    err = open(logs / "stderr", "wb")
    proc = subprocess.Popen([DLLM, "serve", "--host", "127.0.0.1", "--port", str(port), "--max-tokens", "160"],
                            stdout=subprocess.DEVNULL, stderr=err, stdin=subprocess.DEVNULL,
                            env=dict(os.environ, DLLM_DEBUG="0"))
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        assert proc.poll() is None, (logs / "stderr").read_text()
        try:
            if httpx.get(base + "/health", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "dllm serve did not come up"
        time.sleep(0.1)
    yield base
    proc.send_signal(signal.SIGTERM)
    proc.wait(30)
    err.close()
    assert "Traceback" not in (logs / "stderr").read_text()


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)


def _streamed(url: str, **kw: Any) -> tuple[str, list[Any], str, Any]:
    """(content, tool_calls, finish_reason, usage) of a streamed chat completion."""
    text, calls, finish, usage = "", [], "", None
    for chunk in client(url).chat.completions.create(model="demo", stream=True,
                                                     stream_options={"include_usage": True}, **kw):
        if chunk.usage is not None:
            usage = chunk.usage
        for ch in chunk.choices:
            text += ch.delta.content or ""
            calls += ch.delta.tool_calls or []
            finish = ch.finish_reason or finish
    return text, calls, finish, usage


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("mode", ["quality", "speed"])
def test_response_format_json_schema(url: str, stream: bool, mode: str) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "city", "schema": SCHEMA, "strict": True}}
    for question in ["Describe France.", "What is 23 + 45?", "hello"]:
        kw = dict(messages=[{"role": "user", "content": question}], response_format=fmt,
                  extra_body={"dllm": {"mode": mode}})
        if stream:
            text, _, finish, usage = _streamed(url, **kw)
        else:
            r = client(url).chat.completions.create(model="demo", **kw)
            text, finish, usage = r.choices[0].message.content, r.choices[0].finish_reason, r.usage
        assert finish == "stop", text
        jsonschema.validate(json.loads(text), SCHEMA)
        assert usage.dllm["constrained"] == "json_schema"


def test_json_object_and_completions(url: str) -> None:
    r = client(url).chat.completions.create(model="demo", messages=MSG, response_format={"type": "json_object"})
    assert isinstance(json.loads(r.choices[0].message.content), dict)
    assert r.usage.dllm["constrained"] == "json_object"
    c = client(url).completions.create(model="demo", prompt="Sort: 5 2 9", max_tokens=64,
                                       extra_body={"response_format": {"type": "json_schema", "json_schema": {
                                           "name": "n", "schema": {"type": "array", "items": {"type": "integer"},
                                                                   "maxItems": 3}}}})
    assert all(isinstance(v, int) for v in json.loads(c.choices[0].text))
    plain = client(url).chat.completions.create(model="demo", messages=MSG)
    assert plain.usage.dllm["constrained"] is None


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "add"}}])
def test_forced_tool_calls_parse_and_validate(url: str, stream: bool, choice: Any) -> None:
    kw = dict(messages=[{"role": "user", "content": "What is 23 + 45?"}], tools=TOOLS, tool_choice=choice)
    if stream:
        _, calls, finish, usage = _streamed(url, **kw)
    else:
        r = client(url).chat.completions.create(model="demo", **kw)
        calls, finish, usage = r.choices[0].message.tool_calls or [], r.choices[0].finish_reason, r.usage
    assert finish == "tool_calls" and calls and usage.dllm["constrained"] == "tool_call"
    for call in calls:
        name = call.function.name
        assert name in PARAMS and (choice == "required" or name == "add")
        jsonschema.validate(json.loads(call.function.arguments), PARAMS[name])


def test_auto_is_plain_text_or_a_valid_call(url: str) -> None:
    for question in ["What is 23 + 45?", "Sort: 5 2 9", "hello"]:
        r = client(url).chat.completions.create(model="demo", messages=[{"role": "user", "content": question}],
                                                tools=TOOLS, tool_choice="auto")
        msg = r.choices[0].message
        if msg.tool_calls:
            for call in msg.tool_calls:
                jsonschema.validate(json.loads(call.function.arguments), PARAMS[call.function.name])
        else:
            assert "<tool_call>" not in (msg.content or "")


def test_unsupported_schema_is_a_400_naming_the_keyword(url: str) -> None:
    for schema, needle in [({"type": "object", "patternProperties": {"a": {}}}, "patternProperties"),
                           ({"enum": []}, "forbids every value"), ({"$ref": "#"}, "recurses")]:
        fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
        with pytest.raises(openai.BadRequestError) as e:
            client(url).chat.completions.create(model="demo", messages=MSG, response_format=fmt)
        assert needle in str(e.value)
    bad_tool = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "not": {}}}}]
    with pytest.raises(openai.BadRequestError) as e:
        client(url).chat.completions.create(model="demo", messages=MSG, tools=bad_tool, tool_choice="required")
    assert "'not'" in str(e.value) and "tools.0.function.parameters" in str(e.value)
    with pytest.raises(openai.BadRequestError):
        client(url).chat.completions.create(model="demo", messages=MSG, response_format={"type": "yaml"})


@pytest.mark.parametrize("stream", [False, True])
def test_running_out_of_tokens_is_length_with_the_text_so_far(url: str, stream: bool) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "city", "schema": SCHEMA}}
    kw = dict(messages=MSG, response_format=fmt, max_tokens=4)
    if stream:
        text, _, finish, _ = _streamed(url, **kw)
    else:
        r = client(url).chat.completions.create(model="demo", **kw)
        text, finish = r.choices[0].message.content, r.choices[0].finish_reason
    assert finish == "length" and text.startswith("{")
