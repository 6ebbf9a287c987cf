"""``dllm serve``: every request field strictly typed and in its domain, valid Unicode, errors naming the request
field; the Host header, the API key before the body, HEAD, and the headers that go with 401 and 429."""
from __future__ import annotations

import json

import httpx
import pytest

from dllm_cli.errors import UsageError
from dllm_cli.serve import ServeSettings
from dllm_cli.serve.errors import from_library, request_fields
from dllm_cli.serve.guard import GuardPolicy, host_name
from serve_fakes import RunningServer, ScriptedBackend

USER = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def server():
    backend = ScriptedBackend(lambda spec: "ok")
    srv = RunningServer(lambda: backend)
    yield srv, backend
    srv.stop()


def _post(srv, path, raw: bytes, **headers):
    return httpx.post(srv.url + path, content=raw, headers={"content-type": "application/json", **headers})


@pytest.mark.parametrize("path, body, param", [
    # wrong types are refused, never coerced (OpenAI refuses them too)
    ("/v1/chat/completions", {"messages": USER, "max_tokens": True}, "max_tokens"),
    ("/v1/chat/completions", {"messages": USER, "max_tokens": 7.0}, "max_tokens"),
    ("/v1/chat/completions", {"messages": USER, "stream": "yes"}, "stream"),
    ("/v1/completions", {"prompt": "p", "stream": 1}, "stream"),
    ("/v1/chat/completions", {"messages": USER, "temperature": "0.5"}, "temperature"),
    ("/v1/chat/completions", {"messages": USER, "top_p": True}, "top_p"),
    ("/v1/chat/completions", {"messages": USER, "n": 1.0}, "n"),
    ("/v1/chat/completions", {"messages": USER, "seed": "3"}, "seed"),
    ("/v1/chat/completions", {"messages": USER, "stop": 3}, "stop"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
    ("/v1/chat/completions", {"messages": USER, "dllm": {"events": "true"}}, "dllm.events"),
    ("/v1/chat/completions", {"messages": USER, "dllm": {"editing": 0}}, "dllm.editing"),
    ("/v1/chat/completions", {"messages": USER, "dllm": {"top_k": 2.5}}, "dllm.top_k"),
    ("/v1/chat/completions", {"messages": USER, "stream_options": {"include_usage": "no"}},
     "stream_options.include_usage"),
    ("/v1/completions", {"prompt": "p", "echo": "false"}, "echo"),
    ("/v1/completions", {"prompt": 42}, "prompt"),
    # domains
    ("/v1/chat/completions", {"messages": USER, "seed": -1}, "seed"),
    ("/v1/chat/completions", {"messages": USER, "seed": 2**64}, "seed"),
    ("/v1/chat/completions", {"messages": USER, "dllm": {"top_k": 2**40}}, "dllm.top_k"),
    ("/v1/chat/completions", {"messages": USER, "temperature": 1e-310}, "temperature"),
    ("/v1/chat/completions", {"messages": USER, "temperature": 5e-324}, "temperature"),
    ("/v1/completions", {"prompt": "p", "temperature": 1e-9}, "temperature"),
    ("/v1/chat/completions", {"messages": USER, "dllm": {"block_length": 64}}, "dllm.block_length"),
    ("/v1/chat/completions", {"messages": USER, "dllm": {"block_length": 16}}, "dllm.block_length"),
    ("/v1/completions", {"prompt": "   "}, "prompt"),
])
def test_wrong_types_and_values_are_400_naming_the_field(server, path, body, param):
    srv, backend = server
    before = len(backend.specs)
    r = _post(srv, path, json.dumps(body).encode())
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error" and "Traceback" not in r.text
    assert len(backend.specs) == before


@pytest.mark.parametrize("path, raw, param", [
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "a\\ud800b"}]}', "messages.0.content"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\udfff"}]}]}',
     "messages.0.content.0.text"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "stop": ["\\udbff"]}', "stop.0"),
    ("/v1/completions", b'{"prompt": "x\\ud83d"}', "prompt"),
    ("/v1/completions", b'{"prompt": "ok", "user": "\\ud800\\ud800"}', "user"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function", '
     b'"function": {"name": "f", "parameters": {"\\ud800": 1}}}]}', "tools.0.function.parameters.\\ud800"),
])
def test_lone_surrogates_are_400_naming_the_field(server, path, raw, param):
    srv, backend = server
    before = len(backend.specs)
    r = _post(srv, path, raw)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and "surrogate" in err["message"]
    assert len(backend.specs) == before
    ok = _post(srv, "/v1/completions", b'{"prompt": "pair \\ud83d\\ude00 is fine"}')  # a valid pair: an emoji
    assert ok.status_code == 200 and backend.specs[-1].prompt == "pair \U0001F600 is fine"


def test_library_errors_name_request_fields_not_flags():
    text, param = request_fields("--block-length 64 differs from the model (omit --block-length)")
    assert param == "dllm.block_length" and "--" not in text and "'dllm.block_length' 64" in text
    err = from_library(UsageError("LLaDA2.2 editing decodes greedily: use --temperature 0, or --no-edit"))
    assert err.status == 400 and err.param == "temperature" and "--" not in err.message
    assert "'dllm.editing=false'" in err.message
    assert request_fields("--max-tokens must be an integer")[1] == "max_tokens"
    assert request_fields("--top-k must be >= 0")[1] == "dllm.top_k"  # not confused with --top-p


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8000", "127.0.0.1.nip.io", "localhost.evil.com",
                                  "[::2]", "0.0.0.0"])
def test_a_loopback_server_refuses_foreign_host_headers(server, host):
    srv, _ = server
    for method, path in (("GET", "/health"), ("GET", "/"), ("POST", "/v1/completions")):
        r = httpx.request(method, srv.url + path, headers={"host": host}, json={"prompt": "p"})
        assert r.status_code == 403 and r.json()["error"]["code"] == "host_not_allowed"
        assert "--allowed-host" in r.json()["error"]["message"]


def test_own_names_and_allowed_hosts_are_answered():
    backend = ScriptedBackend(lambda spec: "ok")
    allowed = GuardPolicy.hosts_for("127.0.0.1", True, ["my-box.lan"])
    srv = RunningServer(lambda: backend, settings=ServeSettings(allowed_hosts=allowed))
    try:
        for host in ("localhost", f"localhost:{srv.port}", "LOCALHOST.", f"127.0.0.1:{srv.port}", "[::1]",
                     f"[::1]:{srv.port}", "my-box.lan:80"):
            assert httpx.get(srv.url + "/health", headers={"host": host}).status_code == 200, host
        assert httpx.get(srv.url + "/health", headers={"host": "other.lan"}).status_code == 403
    finally:
        srv.stop()
    assert GuardPolicy.hosts_for("0.0.0.0", False, []) == frozenset()  # any name reaches a public bind
    assert GuardPolicy.hosts_for("127.0.0.1", True, ["*"]) == frozenset()
    assert GuardPolicy.hosts_for("::1", True, []) >= {"[::1]", "localhost", "127.0.0.1"}
    assert [host_name(h) for h in ("A.b:1", "[::1]:80", "x.", "[fe80::1]")] == ["a.b", "[::1]", "x", "[fe80::1]"]


def test_the_key_is_checked_before_the_body_and_401_says_how():
    backend = ScriptedBackend(lambda spec: "ok")
    srv = RunningServer(lambda: backend, settings=ServeSettings(api_key="k3y", max_body_bytes=4096))
    try:
        for raw in (b"{not json", b'{"messages": "x"}', b"[]", b"x" * 10_000):
            r = _post(srv, "/v1/chat/completions", raw)
            assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
        r = _post(srv, "/v1/chat/completions", b"{not json", authorization="Bearer k3y")
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
        assert httpx.get(srv.url + "/v1/models", headers={"authorization": "Bearer k3y"}).status_code == 200
    finally:
        srv.stop()


def test_head_is_answered_on_get_routes(server):
    srv, _ = server
    for path in ("/health", "/", "/v1/models", "/favicon.ico"):
        get, head = httpx.get(srv.url + path), httpx.head(srv.url + path)
        assert head.status_code == get.status_code and head.content == b"", path
        assert head.headers.get("content-type") == get.headers.get("content-type")
    r = httpx.head(srv.url + "/v1/chat/completions")
    assert r.status_code == 405 and r.headers["allow"] == "POST"


def test_429_says_when_to_retry():
    import threading
    import time

    backend = ScriptedBackend(lambda spec: ["x "] * 30, delay=0.02)
    srv = RunningServer(lambda: backend, queue_size=1)
    threads = [threading.Thread(target=lambda: httpx.post(srv.url + "/v1/completions", json={"prompt": "p"},
                                                          timeout=30)) for _ in range(2)]
    try:
        for t in threads:
            t.start()
            time.sleep(0.2)
        r = httpx.post(srv.url + "/v1/completions", json={"prompt": "p"})
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
    finally:
        for t in threads:
            t.join(30)
        srv.stop()


def test_a_body_that_does_not_arrive_in_time_is_408():
    import socket

    backend = ScriptedBackend(lambda spec: "ok")
    srv = RunningServer(lambda: backend, settings=ServeSettings(body_timeout_s=0.5))
    try:
        with socket.create_connection(("127.0.0.1", srv.port)) as s:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 100\r\n\r\n{\"prompt\": ")  # and then nothing
            s.settimeout(5)
            head = b""
            while b"request_timeout" not in head and (chunk := s.recv(4096)):
                head += chunk
        assert head.startswith(b"HTTP/1.1 408") and b"request_timeout" in head
        assert backend.specs == [] and httpx.get(srv.url + "/health").status_code == 200
    finally:
        srv.stop()
