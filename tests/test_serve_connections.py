"""``dllm serve``'s connection layer: idle and slow sockets time out, connections are capped under the open-file
limit, floods cannot fill the log, half-closed clients get their answer, dropped clients are one INFO line.
The server runs in its own process (``serve_proc.py``) where the test needs its stderr or a lowered ``ulimit -n``.
Loopback only; every flood is bounded in count and time."""
from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from dllm_cli.serve.connections import RepeatFilter
from serve_fakes import RunningServer, ScriptedBackend, free_port

HERE = Path(__file__).parent


class Proc:
    """``serve_proc.py`` on a free port, stderr to a file; ``stop()`` sends SIGTERM and returns the exit code."""

    def __init__(self, tmp_path: Path, **opts) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.err_path = tmp_path / "stderr"
        self._err = open(self.err_path, "wb")
        self.proc = subprocess.Popen([sys.executable, str(HERE / "serve_proc.py"), str(self.port), json.dumps(opts)],
                                     stdout=subprocess.DEVNULL, stderr=self._err, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while b"ready on" not in self.err_path.read_bytes():
            assert self.proc.poll() is None, self.stderr()
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.05)

    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(20)
        self._err.close()
        return rc


def _raw(port: int, request: bytes, *, half_close: bool, timeout: float = 10.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(request)
        if half_close:
            s.shutdown(socket.SHUT_WR)
        s.settimeout(timeout)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out


def _final(response: bytes) -> tuple[int, bytes]:
    """Status and body of the final response (interim ``100 Continue`` responses skipped)."""
    while response.startswith(b"HTTP/1.1 100"):
        response = response.split(b"\r\n\r\n", 1)[1]
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def test_half_closed_clients_get_their_answer():
    """``shutdown(SHUT_WR)`` after an HTTP/1.1 request, as ``nc -N`` does: the answer still arrives (after interim
    ``100 Continue`` probes, which HTTP/1.1 clients skip)."""
    backend = ScriptedBackend(lambda spec: ["a ", "b"], delay=0.05)
    server = RunningServer(lambda: backend)
    try:
        for prompt, stream in (("one", False), ("two", True)):
            body = json.dumps({"prompt": prompt, "stream": stream}).encode()
            req = (b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                   b"Content-Length: %d\r\n\r\n" % len(body) + body)
            status, payload = _final(_raw(server.port, req, half_close=True))
            assert status == 200
            if stream:
                assert b"data: [DONE]" in payload and b'"text": "a "' in payload
            else:
                assert json.loads(payload)["choices"][0]["text"] == "a b"
        status, payload = _final(_raw(server.port, b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n", half_close=True))
        assert status == 200 and json.loads(payload)["status"] == "ok"
        assert [s.prompt for s in backend.specs] == ["one", "two"]
    finally:
        server.stop()


def test_dropped_clients_are_one_info_line_each(tmp_path):
    server = Proc(tmp_path, blocks=40, delay=0.05)
    try:
        with pytest.raises(httpx.ReadTimeout):  # waiting for a non-streaming answer
            httpx.post(server.url + "/v1/completions", json={"prompt": "a"}, timeout=0.5)
        with httpx.stream("POST", server.url + "/v1/completions", json={"prompt": "b", "stream": True}) as r:
            next(line for line in r.iter_lines() if line.startswith("data:"))  # then gone mid-stream
        time.sleep(1.0)
        assert httpx.get(server.url + "/health").json()["queue"]["running"] == 0
    finally:
        rc = server.stop()
    err = server.stderr()
    assert rc == 143, err
    assert "Traceback" not in err and "ERROR" not in err and "CancelledError" not in err
    gone = [line for line in err.splitlines() if "the client went away" in line]
    assert len(gone) == 1 and gone[0].startswith("INFO:")


def test_an_idle_connection_flood_is_bounded_and_the_log_stays_small(tmp_path):
    """400 idle sockets against a server whose ``ulimit -n`` is 256: no accept errors, a short log, and a normal
    client is answered again once the idle sockets have timed out."""
    server = Proc(tmp_path, nofile=256, max_connections=10_000, header_timeout_s=1.0)
    socks: list[socket.socket] = []
    try:
        t0 = time.monotonic()
        for _ in range(400):
            try:
                socks.append(socket.create_connection(("127.0.0.1", server.port), timeout=2))
            except OSError:
                pass
        for s in socks[:100]:
            s.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n")  # a head that never ends (slowloris)
        assert time.monotonic() - t0 < 10
        for _ in range(5):  # during the flood: a new client displaces the oldest idle socket
            t1 = time.monotonic()
            assert httpx.get(server.url + "/health", timeout=5).status_code == 200
            assert time.monotonic() - t1 < 1.0
        time.sleep(2.0)  # past the header timeout: the idle sockets are gone
        assert httpx.get(server.url + "/health", timeout=5).status_code == 200
        assert server.proc.poll() is None
    finally:
        for s in socks:
            s.close()
        rc = server.stop()
    err = server.stderr()
    assert rc == 143 and len(err.encode()) < 16_000, err[-2000:]
    assert "out of system resource" not in err and "Too many open files" not in err
    assert err.count("connection limit") <= 5


def test_a_burst_of_connections_is_queued_not_dropped(tmp_path):
    """While the server cannot accept (stopped here; busy or descheduled in life), a burst of 300 connections waits
    in the kernel's listen queue: every handshake completes at once, and each is served once the server runs.
    With the 64-long queue asyncio's ``create_server`` leaves, the 66th handshake was dropped and its client
    stalled for its 1 s retransmission timeout (the flood test's new client sometimes took 1.007 s)."""
    server = Proc(tmp_path)
    socks: list[socket.socket] = []
    try:
        server.proc.send_signal(signal.SIGSTOP)
        for i in range(300):
            t0 = time.monotonic()
            socks.append(socket.create_connection(("127.0.0.1", server.port), timeout=0.5))
            assert time.monotonic() - t0 < 0.5, f"handshake {i} waited for a retransmission"
        server.proc.send_signal(signal.SIGCONT)
        for s in socks[-3:]:
            s.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            s.settimeout(10)
            assert s.recv(1024).startswith(b"HTTP/1.1 200")
    finally:
        server.proc.send_signal(signal.SIGCONT)
        for s in socks:
            s.close()
        assert server.stop() == 143


def test_a_garbage_request_flood_logs_a_few_lines(tmp_path):
    server = Proc(tmp_path)
    try:
        for _ in range(300):
            with socket.create_connection(("127.0.0.1", server.port)) as s:
                s.sendall(b"\x16\x03\x01 not http at all\r\n\r\n")
                s.settimeout(5)
                s.recv(1024)
        assert httpx.get(server.url + "/health").status_code == 200
    finally:
        server.stop()
    err = server.stderr()
    assert 1 <= err.count("Invalid HTTP request") <= 5 and len(err.encode()) < 8_000, err[-2000:]


def test_repeat_filter_collapses_repeats_and_says_how_many():
    logger = logging.getLogger("test.repeats")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())

    handler = Collect()
    flt = RepeatFilter(burst=3, window_s=0.2)
    handler.addFilter(flt)
    logger.addHandler(handler)
    try:
        for i in range(10_000):
            logger.error("accept failed: %s", f"errno {i % 7}")
        for i in range(3):
            logger.info("GET /%d 200", i)  # distinct INFO lines (the access log) all pass
        time.sleep(0.25)
        logger.error("accept failed: %s", "again")
    finally:
        logger.removeHandler(handler)
    assert lines[:3] == ["accept failed: errno 0", "accept failed: errno 1", "accept failed: errno 2"]
    assert lines[3:6] == ["GET /0 200", "GET /1 200", "GET /2 200"]
    assert lines[6] == "accept failed: again (and 9997 more like it in the last 0.2 s, not shown)"
    assert len(lines) == 7


def test_busy_port_and_bad_host_fail_in_one_line_before_loading(tmp_path):
    dllm = str(Path(sys.executable).with_name("dllm"))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        env = dict(os.environ, DLLM_HOME=str(tmp_path), DLLM_MODEL=str(tmp_path / "missing.gguf"))
        r = subprocess.run([dllm, "serve", "--port", str(port)], capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and f"port {port}" in r.stderr and "--port 0" in r.stderr
    assert "missing.gguf" not in r.stderr  # refused before the model was looked at
    for host, code in (("no-such-host.invalid", 2), ("256.1.1.1", 2), ("192.0.2.1", 2)):
        r = subprocess.run([dllm, "serve", "--host", host, "--port", "0", "--api-key", "k"], capture_output=True,
                           text=True, timeout=60, env=env)
        assert r.returncode == code and r.stderr.count("\n") == 1 and "--host" in r.stderr, (host, r.stderr)
        assert "Traceback" not in r.stderr and "uvicorn" not in r.stderr.lower()


def test_sigterm_is_prompt_while_a_prompt_is_prepared(tmp_path):
    """A long preparation in flight (the 20,000-message case took 51 s on the model's thread): SIGTERM still ends
    the server within a few seconds, the client answered 503, exit 143."""
    import threading

    server = Proc(tmp_path, blocks=1000, delay=0.02, prepare_delay=60.0)
    got: dict[str, object] = {}

    def ask(key: str, body: dict) -> None:
        try:
            got[key] = httpx.post(server.url + "/v1/completions", json=body, timeout=30).status_code
        except httpx.HTTPError as e:
            got[key] = type(e).__name__

    thread = threading.Thread(target=ask, args=("long", {"prompt": "p"}))
    thread.start()
    time.sleep(0.5)
    t0 = time.monotonic()
    rc = server.stop()
    thread.join(10)
    assert rc == 143 and time.monotonic() - t0 < 4.0, server.stderr()
    assert got["long"] == 503 and "Traceback" not in server.stderr()


def test_a_client_dropped_during_preparation_is_one_info_line(tmp_path):
    server = Proc(tmp_path, prepare_delay=3.0)
    try:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(server.url + "/v1/completions", json={"prompt": "a"}, timeout=0.3)
        deadline = time.monotonic() + 3
        while "the client went away" not in server.stderr():
            assert time.monotonic() < deadline, server.stderr()
            time.sleep(0.05)
    finally:
        server.stop()
    err = server.stderr()
    assert "Traceback" not in err and "ERROR" not in err and err.count("the client went away") == 1
