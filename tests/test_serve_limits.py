"""``dllm serve``: no single client can hold the model. Ceilings on what a request may ask, a request timeout,
queue slots freed when a waiting client leaves, and prompt preparation that is cheap to refuse and runs off the
model's thread. Scripted backend (no model needed)."""
from __future__ import annotations

import json
import threading
import time

import httpx
import openai
import pytest

from dllm_cli.serve import ServeSettings
from dllm_cli.serve.validate import Ceilings, ContextInfo
from serve_fakes import RunningServer, ScriptedBackend

USER = [{"role": "user", "content": "hi"}]


def _wait(cond, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def _client(server, timeout=30.0):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=timeout)


@pytest.fixture
def capped():
    backend = ScriptedBackend(lambda spec: ["ok"])
    server = RunningServer(lambda: backend, settings=ServeSettings(ceilings=Ceilings(max_tokens=64, max_post_steps=8)))
    yield server, backend
    server.stop()


@pytest.mark.parametrize("path, body, param", [
    ("/v1/chat/completions", {"messages": USER, "max_tokens": 65}, "max_tokens"),
    ("/v1/chat/completions", {"messages": USER, "max_tokens": 10**9}, "max_tokens"),
    ("/v1/chat/completions", {"messages": USER, "max_completion_tokens": 4096}, "max_completion_tokens"),
    ("/v1/completions", {"prompt": "p", "max_tokens": 2**31 - 1}, "max_tokens"),
    ("/v1/chat/completions", {"messages": USER, "dllm": {"max_post_steps": 9}}, "dllm.max_post_steps"),
    ("/v1/completions", {"prompt": "p", "dllm": {"max_post_steps": 4096}}, "dllm.max_post_steps"),
])
def test_a_request_over_a_ceiling_is_a_400_naming_its_field(capped, path, body, param):
    server, backend = capped
    r = httpx.post(server.url + path, json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and "limit" in err["message"] and "--" not in err["message"].split("(")[0]
    assert backend.specs == []


def test_requests_at_the_ceilings_run(capped):
    server, backend = capped
    r = httpx.post(server.url + "/v1/chat/completions",
                   json={"messages": USER, "max_tokens": 64, "dllm": {"max_post_steps": 8}})
    assert r.status_code == 200 and backend.specs[-1].overrides == {"max_tokens": 64, "max_post_steps": 8}


def test_a_request_past_the_timeout_ends_with_length_and_frees_the_model():
    backend = ScriptedBackend(lambda spec: ["x "] * 500, delay=0.01)  # ~10 s if not stopped
    server = RunningServer(lambda: backend, request_timeout_s=0.5)
    try:
        t0 = time.monotonic()
        r = _client(server).chat.completions.create(model="x", messages=USER)
        assert time.monotonic() - t0 < 2.5 and r.choices[0].finish_reason == "length"
        assert r.choices[0].message.content.startswith("x x ") and backend.steps < 200
        t0 = time.monotonic()
        with httpx.stream("POST", server.url + "/v1/completions", json={"prompt": "p", "stream": True}) as s:
            lines = [line for line in s.iter_lines() if line.startswith("data: ")]
        assert time.monotonic() - t0 < 2.5 and lines[-1] == "data: [DONE]"
        assert json.loads(lines[-2][6:])["choices"][0]["finish_reason"] == "length"
        backend.answer = lambda spec: "next"
        assert _client(server).completions.create(model="x", prompt="p").choices[0].text == "next"
    finally:
        server.stop()


def test_a_second_client_is_answered_promptly_while_a_hostile_request_runs():
    """The hostile client asks for everything the ceilings allow on a slow model; the timeout bounds it."""
    backend = ScriptedBackend(lambda spec: ["x "] * 1000 if spec.prompt == "hostile" else ["fine"], delay=0.01)
    server = RunningServer(lambda: backend, request_timeout_s=1.0,
                           settings=ServeSettings(ceilings=Ceilings(max_tokens=512, max_post_steps=32)))
    got: dict[str, object] = {}

    def hostile():
        body = {"prompt": "hostile", "max_tokens": 512, "dllm": {"max_post_steps": 32}, "stream": True}
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=30) as r:
            got["hostile"] = [line for line in r.iter_lines() if line]

    try:
        t = threading.Thread(target=hostile)
        t.start()
        _wait(lambda: server.worker.status()["running"] == 1)
        t0 = time.monotonic()
        r = _client(server, timeout=10).completions.create(model="x", prompt="second")
        waited = time.monotonic() - t0
        assert r.choices[0].text == "fine" and waited < 2.0, waited
        t.join(10)
        assert got["hostile"][-1] == "data: [DONE]"
    finally:
        server.stop()


@pytest.mark.parametrize("stream", [False, True])
def test_a_queued_client_that_leaves_frees_its_slot_at_once(stream):
    backend = ScriptedBackend(lambda spec: ["x "] * 100, delay=0.02)  # ~4 s a request
    server = RunningServer(lambda: backend, queue_size=1)
    first = threading.Thread(target=lambda: httpx.post(server.url + "/v1/completions", json={"prompt": "a"},
                                                       timeout=30))
    try:
        first.start()
        _wait(lambda: server.worker.status()["running"] == 1)
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(server.url + "/v1/completions", json={"prompt": "b", "stream": stream}, timeout=0.5)
        t0 = time.monotonic()
        _wait(lambda: server.worker.status()["waiting"] == 0, timeout=1.5)
        assert server.worker.status()["running"] == 1 and time.monotonic() - t0 < 1.0
        backend.answer = lambda spec: ["x "] * 100 if spec.prompt != "c" else "third"
        third: dict[str, httpx.Response] = {}
        t = threading.Thread(target=lambda: third.setdefault("r", httpx.post(
            server.url + "/v1/completions", json={"prompt": "c"}, timeout=30)))
        t.start()  # the freed slot takes it: no 429
        t.join(30)
        assert third["r"].status_code == 200 and third["r"].json()["choices"][0]["text"] == "third"
        assert [s.prompt for s in backend.specs] == ["a", "c"]  # the one that left never ran
    finally:
        first.join(30)
        server.stop()


def test_many_messages_are_refused_before_any_template_or_tokenizer_work():
    backend = ScriptedBackend(lambda spec: "ok", context=ContextInfo(n_ctx=4096, max_token_chars=16))
    server = RunningServer(lambda: backend)
    try:
        for n in (4096, 20_000):
            msgs = [{"role": "user", "content": "x"}] * n
            t0 = time.monotonic()
            r = httpx.post(server.url + "/v1/chat/completions", json={"messages": msgs}, timeout=30)
            assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
            assert r.json()["error"]["param"] == "messages" and time.monotonic() - t0 < 2.0
        for path, body, param in (
                ("/v1/completions", {"prompt": "y" * (4096 * 16 + 1)}, "prompt"),
                ("/v1/chat/completions", {"messages": [{"role": "user", "content": "z" * 40_000}] * 2}, "messages"),
                ("/v1/chat/completions", {"messages": USER, "tools": [{"type": "function", "function": {
                    "name": "f", "description": "w" * 70_000}}]}, "messages")):
            r = httpx.post(server.url + path, json=body, timeout=30)
            assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
            assert "characters" in r.json()["error"]["message"]
        assert backend.prepare_threads == [] and backend.specs == []
        assert httpx.post(server.url + "/v1/chat/completions", json={"messages": USER}).status_code == 200
    finally:
        server.stop()


def test_preparation_runs_off_the_models_thread_and_does_not_hold_it():
    backend = ScriptedBackend(lambda spec: ["x "] * 25, delay=0.02, prepare_delay=0.6)
    server = RunningServer(lambda: backend)
    try:
        done: list[float] = []
        t0 = time.monotonic()
        threads = [threading.Thread(target=lambda p=p: (httpx.post(server.url + "/v1/completions",
                                                                   json={"prompt": p}, timeout=30),
                                                        done.append(time.monotonic() - t0))) for p in "ab"]
        for t in threads:
            t.start()
            time.sleep(0.05)
        for t in threads:
            t.join(30)
        model_thread = server.worker._thread
        # generation iterates on a slot thread (the model's thread pumps its decodes); preparation on neither
        assert backend.thread is not None and backend.thread.name.startswith("dllm-slot-")
        assert backend.prepare_threads and all(t is not model_thread and t is not backend.thread
                                               and t.name.startswith("dllm-prepare")
                                               for t in backend.prepare_threads)
        # b's preparation overlapped a's decoding (0.6 + 1.0 s), not after it (0.6 + 1.0 + 0.6 + 1.0 s)
        assert max(done) < 3.0, done
    finally:
        server.stop()


def test_shutdown_waits_for_no_long_preparation():
    backend = ScriptedBackend(lambda spec: "ok", prepare_delay=0.3)
    server = RunningServer(lambda: backend)
    t = threading.Thread(target=lambda: httpx.post(server.url + "/v1/completions", json={"prompt": "p"}, timeout=30))
    t.start()
    _wait(lambda: backend.prepare_threads)
    t0 = time.monotonic()
    server.stop()
    t.join(10)
    assert time.monotonic() - t0 < 3.0 and backend.closed


def test_a_client_that_leaves_during_preparation_stops_it_and_frees_its_slot():
    backend = ScriptedBackend(lambda spec: "ok", prepare_delay=5.0)
    server = RunningServer(lambda: backend, queue_size=1)
    try:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(server.url + "/v1/completions", json={"prompt": "p"}, timeout=0.3)
        _wait(lambda: backend.prepare_stopped == 1, timeout=1.5)
        assert server.worker.status()["waiting"] == 0 and backend.specs == []
        backend.prepare_delay = 0.0
        assert httpx.post(server.url + "/v1/completions", json={"prompt": "q"}).status_code == 200
    finally:
        server.stop()
