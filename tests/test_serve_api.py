"""``dllm serve`` through the real ``openai`` client and raw HTTP, on a scripted backend (no model needed).

The scripted backend (``serve_fakes.ScriptedBackend``) stands in for the model behind the same worker thread,
so tools, cancellation, the queue limit and every error status are tested without a runtime. The tests on the
real demo model are in ``test_serve_model.py``.
"""
from __future__ import annotations

import json
import threading
import time

import httpx
import openai
import pytest

from dllm_cli.serve import ServeSettings
from serve_fakes import RunningServer, ScriptedBackend

USER = [{"role": "user", "content": "hi"}]
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


@pytest.fixture
def scripted():
    """A server whose backend answers ``backend.reply`` (a list of block texts); yields (server, backend)."""
    backend = ScriptedBackend(lambda spec: backend.reply)
    backend.reply = ["Hello ", "world. ", "Bye."]
    server = RunningServer(lambda: backend, settings=ServeSettings(max_body_bytes=64 * 1024))
    yield server, backend
    server.stop()
    assert backend.closed


def client(server, key="none", **kw):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=30, **kw)


def test_chat_and_completion_streaming_and_not(scripted):
    server, backend = scripted
    c = client(server)
    r = c.chat.completions.create(model="any", messages=USER)
    assert r.choices[0].message.content == "Hello world. Bye." and r.choices[0].finish_reason == "stop"
    assert r.object == "chat.completion" and r.model == "scripted"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (3, 12, 15)
    assert r.usage.dllm == {"mode": "quality", "forwards": 6, "tokens_per_forward": 2.0, "edits": 3, "inserts": 0,
                            "deletes": 0, "steps": 6,
                            "reused_prompt_tokens": 0, "constrained": None, "elapsed_s": 0.06,
                            "tokens_per_second": 200.0}
    chunks = list(c.chat.completions.create(model="any", messages=USER, stream=True,
                                            stream_options={"include_usage": True}))
    deltas = [ch.choices[0].delta.content for ch in chunks if ch.choices and ch.choices[0].delta.content]
    assert deltas == ["Hello ", "world. ", "Bye."]  # one delta per finalized block
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    r = c.completions.create(model="any", prompt="raw text")
    assert r.choices[0].text == "Hello world. Bye." and r.object == "text_completion"
    assert backend.specs[-1].prompt == "raw text" and backend.specs[-1].messages is None
    text = "".join(ch.choices[0].text for ch in c.completions.create(model="any", prompt="raw", stream=True))
    assert text == "Hello world. Bye."
    assert [m.id for m in c.models.list()] == ["scripted"]


def test_request_fields_reach_the_generation_spec(scripted):
    server, backend = scripted
    client(server).chat.completions.create(
        model="x", messages=[{"role": "system", "content": "S"}, {"role": "user", "content": [
            {"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],
        max_tokens=7, temperature=0.5, top_p=0.9, seed=3, extra_body={
            "dllm": {"mode": "speed", "threshold": 0.6, "top_k": 4}, "some_future_field": {"x": 1}})
    spec = backend.specs[-1]
    assert spec.messages == [{"role": "system", "content": "S"}, {"role": "user", "content": "ab"}]
    assert spec.mode == "speed" and not spec.events
    assert spec.overrides == {"max_tokens": 7, "temperature": 0.5, "top_p": 0.9, "seed": 3, "threshold": 0.6,
                              "top_k": 4}


def test_stop_strings_are_cut_exactly_streaming_and_not(scripted):
    server, backend = scripted
    backend.reply = ["Hello wo", "rld. Bye", "."]
    c = client(server)
    r = c.chat.completions.create(model="x", messages=USER, stop=["world", "never"])
    assert r.choices[0].message.content == "Hello " and r.choices[0].finish_reason == "stop"
    chunks = list(c.chat.completions.create(model="x", messages=USER, stop="d. B", stream=True))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks)
    assert text == "Hello worl"
    r = c.completions.create(model="x", prompt="p", stop="Bye")
    assert r.choices[0].text == "Hello world. "


def test_tool_calls_round_trip_with_the_openai_client(scripted):
    server, backend = scripted
    backend.reply = ["Let me check.\n<tool_", "call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>"]
    c = client(server)
    r = c.chat.completions.create(model="x", messages=[{"role": "user", "content": "Weather in Paris?"}],
                                  tools=[WEATHER], tool_choice="auto")
    msg = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls" and msg.content == "Let me check.\n"
    call = msg.tool_calls[0]
    assert call.type == "function" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    system = backend.specs[-1].messages[0]
    assert system["role"] == "system" and "<tools>\n" + json.dumps(WEATHER) + "\n</tools>" in system["content"]
    # the tool's answer goes back as role "tool"; the assistant's call is rendered as the template writes it
    backend.reply = ["It is sunny in Paris."]
    r = c.chat.completions.create(model="x", tools=[WEATHER], messages=[
        {"role": "user", "content": "Weather in Paris?"}, msg.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"}])
    assert r.choices[0].message.content == "It is sunny in Paris." and r.choices[0].finish_reason == "stop"
    sent = backend.specs[-1].messages
    assert sent[2]["role"] == "assistant" and sent[2]["content"] == "Let me check.\n\n" + CALL
    assert sent[3] == {"role": "tool", "content": "sunny, 21 C"}
    # streaming: the text before the call streams, the call arrives whole with finish_reason tool_calls
    backend.reply = ["Let me check.\n", CALL]
    chunks = list(c.chat.completions.create(model="x", messages=USER, tools=[WEATHER], stream=True))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks)
    calls = [tc for ch in chunks for tc in ch.choices[0].delta.tool_calls or []]
    assert text == "Let me check.\n" and [tc.function.name for tc in calls] == ["get_weather"]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_malformed_or_unwanted_tool_calls_come_back_as_text(scripted):
    server, backend = scripted
    bad = '<tool_call>\n{"name": "get_weather", "arguments": {"city": \n</tool_call>'
    backend.reply = [bad]
    c = client(server)
    r = c.chat.completions.create(model="x", messages=USER, tools=[WEATHER])
    assert r.choices[0].message.content == bad and not r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "stop"
    text = "".join(ch.choices[0].delta.content or ""
                   for ch in c.chat.completions.create(model="x", messages=USER, tools=[WEATHER], stream=True))
    assert text == bad
    backend.reply = [CALL]
    r = c.chat.completions.create(model="x", messages=USER, tools=[WEATHER], tool_choice="none")
    assert r.choices[0].message.content == CALL and r.choices[0].finish_reason == "stop"
    assert "<tools>" not in json.dumps(backend.specs[-1].messages)  # "none": tools are not offered either


def test_api_key_is_required_on_v1_when_set():
    backend = ScriptedBackend(lambda spec: "ok")
    server = RunningServer(lambda: backend, settings=ServeSettings(api_key="s3cret"))
    try:
        with pytest.raises(openai.AuthenticationError) as e:
            client(server, key="wrong").chat.completions.create(model="x", messages=USER)
        assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
        r = httpx.get(server.url + "/v1/models")
        assert r.status_code == 401 and r.json()["error"]["type"] == "invalid_request_error"
        assert client(server, key="s3cret").chat.completions.create(model="x", messages=USER).choices[0].message.content == "ok"
        assert httpx.get(server.url + "/health").status_code == 200  # health and the page stay open
        assert backend.specs and len(backend.specs) == 1  # refused requests never reached the model
    finally:
        server.stop()


def _post(server, body, **kw):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(server.url + "/v1/chat/completions", content=data,
                      headers={"content-type": "application/json"}, **kw)


@pytest.mark.parametrize("body, status, param", [
    (b"{not json", 400, None),
    (b"[1, 2]", 400, None),
    ({"model": "x"}, 400, "messages"),
    ({"messages": []}, 400, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages.0.role"),
    ({"messages": USER, "n": 2}, 400, "n"),
    ({"messages": USER, "temperature": 3}, 400, "temperature"),
    ({"messages": USER, "top_p": 0}, 400, "top_p"),
    ({"messages": USER, "max_tokens": 0}, 400, "max_tokens"),
    ({"messages": USER, "max_tokens": "many"}, 400, "max_tokens"),
    ({"messages": USER, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"messages": USER, "dllm": {"threshold": 1.5}}, 400, "dllm.threshold"),
    ({"messages": USER, "dllm": {"mode": "turbo"}}, 400, "dllm.mode"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "messages.0.content"),
    ({"messages": USER + [{"role": "assistant", "content": "x"}]}, 400, "messages"),
    ({"messages": USER, "pad": "x" * 70_000}, 413, None),
])
def test_bad_requests_get_openai_style_errors(scripted, body, status, param):
    server, backend = scripted
    r = _post(server, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["param"] == param and err["message"]
    assert "Traceback" not in r.text
    assert backend.specs == []


def test_completion_errors_and_unknown_routes(scripted):
    server, _ = scripted
    r = httpx.post(server.url + "/v1/completions", json={"prompt": ["a", "b"]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    r = httpx.post(server.url + "/v1/completions", json={})
    assert r.status_code == 400 and r.json()["error"]["code"] == "missing_required_parameter"
    r = httpx.get(server.url + "/v2/everything")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = httpx.get(server.url + "/v1/chat/completions")
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"


def test_a_library_error_is_a_clean_error_json():
    from dllm_cli.errors import ContextFullError

    def answer(spec):
        if spec.prompt == "long":
            raise ContextFullError("the prompt has 9000 tokens but the context holds 4096", "raise --ctx-size")
        raise RuntimeError("boom")

    server = RunningServer(lambda: ScriptedBackend(answer))
    try:
        r = httpx.post(server.url + "/v1/completions", json={"prompt": "long"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
        r = httpx.post(server.url + "/v1/completions", json={"prompt": "long", "stream": True})
        assert r.status_code == 400 and "9000 tokens" in r.json()["error"]["message"]
        r = httpx.post(server.url + "/v1/completions", json={"prompt": "other"})
        assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
        assert "boom" not in r.text and "Traceback" not in r.text
        assert httpx.post(server.url + "/v1/completions", json={"prompt": "long"}).status_code == 400  # still up
    finally:
        server.stop()


def test_full_queue_answers_429_and_health_shows_the_queue():
    backend = ScriptedBackend(lambda spec: ["a"] * 10, delay=0.05)  # ~1 s per request
    server = RunningServer(lambda: backend, queue_size=1)
    results: dict[int, object] = {}

    def ask(i):
        try:
            results[i] = client(server).chat.completions.create(model="x", messages=USER).choices[0].message.content
        except openai.APIStatusError as e:
            results[i] = e.status_code

    try:
        first = threading.Thread(target=ask, args=(0,))
        first.start()
        _wait(lambda: server.worker.status()["running"] == 1)
        second = threading.Thread(target=ask, args=(1,))
        second.start()
        _wait(lambda: server.worker.status()["waiting"] == 1)
        queue = httpx.get(server.url + "/health").json()["queue"]
        assert {k: queue[k] for k in ("waiting", "running", "limit", "parallel")} == {
            "waiting": 1, "running": 1, "limit": 1, "parallel": 1}
        r = _post(server, {"messages": USER})
        assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full"
        first.join(30)
        second.join(30)
        assert results == {0: "a" * 10, 1: "a" * 10}
    finally:
        server.stop()


def _wait(cond, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_client_disconnecting_mid_stream_cancels_at_the_next_step():
    backend = ScriptedBackend(lambda spec: ["x "] * 50, delay=0.05)  # 100 steps, ~5 s if not cancelled
    server = RunningServer(lambda: backend)
    try:
        stream = client(server).chat.completions.create(model="x", messages=USER, stream=True)
        for ch in stream:
            if ch.choices and ch.choices[0].delta.content:
                break
        stream.close()  # the client goes away after the first block
        _wait(lambda: server.worker.status()["running"] == 0, timeout=3)
        assert backend.steps < 20  # stopped within a few steps, not after all 100
        backend.answer = lambda spec: "next"
        r = client(server).chat.completions.create(model="x", messages=USER)
        assert r.choices[0].message.content == "next"
        assert backend.thread is not None and backend.thread.name == "dllm-slot-0"  # a slot thread, not the loop
    finally:
        server.stop()


def test_step_events_are_streamed_on_request(scripted):
    server, backend = scripted
    backend.reply = ["Hi."]
    body = {"messages": USER, "stream": True, "dllm": {"events": True}}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body) as r:
        lines = [line for line in r.iter_lines() if line]
    events = [(lines[i - 1] if i and lines[i - 1].startswith("event:") else "", line[6:])
              for i, line in enumerate(lines) if line.startswith("data: ")]
    steps = [json.loads(d) for e, d in events if e == "event: dllm.step"]
    assert steps == [
        {"block": 0, "step": 0, "cells": [None], "new": [], "edits": [], "inserted": [], "deleted": [], "forwards": 1,
         "masks": 3, "elapsed_s": 0.01},
        {"block": 0, "step": 1, "cells": ["t4"], "new": [0], "edits": [], "inserted": [], "deleted": [], "forwards": 2,
         "masks": 0, "elapsed_s": 0.02}]
    kinds = [e for e, _ in events]
    assert kinds.index("event: dllm.block") < kinds.index("", 1) and events[-1] == ("", "[DONE]")
    with httpx.stream("POST", server.url + "/v1/chat/completions", json={**body, "dllm": {}}) as r:
        assert not any(line.startswith("event:") for line in r.iter_lines())  # off by default


def test_the_page_is_served_from_the_package(scripted):
    server, _ = scripted
    r = httpx.get(server.url + "/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    page = r.text
    assert "dllm.step" in page and "░" in page and "same grammar as the terminal" in page
    assert "http://" not in page.replace("http://www.w3.org", "") and "https://" not in page  # no CDN
    assert httpx.get(server.url + "/favicon.ico").status_code == 204


def test_a_waiting_non_streaming_client_that_gives_up_is_cancelled():
    backend = ScriptedBackend(lambda spec: ["x "] * 50, delay=0.05)  # ~5 s if not cancelled
    server = RunningServer(lambda: backend)
    try:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(server.url + "/v1/completions", json={"prompt": "p"}, timeout=0.5)
        _wait(lambda: server.worker.status()["running"] == 0, timeout=3)
        assert backend.steps < 40
        backend.answer = lambda spec: "next"
        assert httpx.post(server.url + "/v1/completions", json={"prompt": "p"}).json()["choices"][0]["text"] == "next"
    finally:
        server.stop()


def test_shutdown_ends_requests_in_flight_cleanly():
    """Streams end with an error event and [DONE], waiting requests get 503; nothing is cut mid-write."""
    backend = ScriptedBackend(lambda spec: ["x "] * 200, delay=0.05)  # ~20 s if not cancelled
    server = RunningServer(lambda: backend)
    got: dict[str, object] = {}

    def stream():
        with httpx.stream("POST", server.url + "/v1/completions", json={"prompt": "p", "stream": True}) as r:
            got["stream"] = [line for line in r.iter_lines() if line]

    def waiting():
        got["waiting"] = httpx.post(server.url + "/v1/completions", json={"prompt": "q"}, timeout=30)

    threads = [threading.Thread(target=stream), threading.Thread(target=waiting)]
    threads[0].start()
    _wait(lambda: server.worker.status()["running"] == 1)
    threads[1].start()
    _wait(lambda: server.worker.status()["waiting"] == 1)
    t0 = time.monotonic()
    server.stop()
    for t in threads:
        t.join(10)
    assert time.monotonic() - t0 < 4 and backend.closed and backend.steps < 100
    lines = got["stream"]
    assert lines[-1] == "data: [DONE]" and json.loads(lines[-2][6:])["error"]["code"] == "shutting_down"
    r = got["waiting"]
    assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down"
