"""A model split across loopback ggml RPC workers (`dllm rpc-server`) decodes exactly like one process, and every
failure (no worker, not a worker, a worker killed mid-run) is one line, exit 1, no hang, no leftover file."""
from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from dllm_cli.errors import UsageError
from dllm_cli.runtime import rpc
from io_helpers import part_files, part_size

DLLM = str(Path(sys.executable).with_name("dllm"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("text,want", [
    ("127.0.0.1:50052", [("127.0.0.1", 50052)]),
    ("a:1,b:2", [("a", 1), ("b", 2)]),
    ("[::1]:7", [("::1", 7)]),
    (" host:80 ", [("host", 80)]),
])
def test_parse_endpoints(text, want):
    assert [(e.host, e.port) for e in rpc.parse_endpoints(text)] == want


@pytest.mark.parametrize("text", ["", "host", "host:", ":80", "host:0", "host:65536", "host:http", "a:1,a:1",
                                  ",".join(f"h:{i}" for i in range(1, 18)), "a:1,,b:2"])
def test_bad_endpoints_are_usage_errors(text):
    with pytest.raises(UsageError):
        rpc.parse_endpoints(text)


@pytest.mark.parametrize("host,loop", [("127.0.0.1", True), ("127.5.0.1", True), ("::1", True), ("localhost", True),
                                       ("0.0.0.0", False), ("192.168.1.2", False), ("example.org", False)])
def test_is_loopback(host, loop):
    assert rpc.is_loopback(host) is loop


@pytest.fixture(scope="module")
def workers():
    """Two `dllm rpc-server` workers on free loopback ports."""
    from dllm_cli.runtime.library import candidates
    if not candidates("cpu"):
        pytest.skip("no runtime built from the current patches (run `dllm runtime build`)")
    procs, eps = [], []
    for _ in range(2):
        port = _free_port()
        procs.append(subprocess.Popen([DLLM, "rpc-server", "--port", str(port), "--threads", "1"],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        eps.append(rpc.Endpoint("127.0.0.1", port))
    for ep in eps:
        _wait(ep)
    yield procs, ",".join(map(str, eps))
    for p in procs:
        p.terminate()
        p.wait(timeout=20)


def _wait(ep: rpc.Endpoint, timeout: float = 60) -> None:
    t0 = time.monotonic()
    while True:
        try:
            rpc.check(ep)
            return
        except rpc.RpcError:
            if time.monotonic() - t0 > timeout:
                raise
            time.sleep(0.2)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from converters import convert
    from dllm_cli.demo.checkpoint import tiny_config, write_checkpoint
    d = tmp_path_factory.mktemp("rpc")
    write_checkpoint(d / "ckpt", tiny_config(), seed=7, head_scale=4.0)
    return convert(d / "ckpt", d / "peaky-f32.gguf", outtype="f32").path


def _run(model: Path, *extra: str, trace: Path | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    args = [DLLM, "run", str(model), "Sort 3 1 2 and tell me about the fox.", "--json", "--max-tokens", "64",
            "--threads", "1", *extra] + (["--trace", str(trace)] if trace else [])
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("mode", ["quality", "speed"])
def test_split_over_two_workers_is_identical_to_one_process(workers, model, tmp_path, mode):
    _, eps = workers
    alone = _run(model, "--mode", mode, trace=tmp_path / "alone.jsonl")
    split = _run(model, "--mode", mode, "--rpc", eps, "-ngl", "2", trace=tmp_path / "split.jsonl")
    assert alone.returncode == 0 and split.returncode == 0, split.stderr
    a, b = json.loads(alone.stdout), json.loads(split.stdout)
    assert a["tokens"] == b["tokens"] and a["forwards"] == b["forwards"] and a["edits"] == b["edits"]
    ea, eb = ([json.loads(x) for x in (tmp_path / f).read_text().splitlines()] for f in ("alone.jsonl", "split.jsonl"))
    assert len(ea) == len(eb) and sum(e["event"] == "step" for e in ea) == a["forwards"]
    for x, y in zip(ea, eb):  # same events, positions, tokens and counters; confidences to float32 rounding
        assert {k: v for k, v in x.items() if k not in ("elapsed_s", "tps", "probs")} == \
               {k: v for k, v in y.items() if k not in ("elapsed_s", "tps", "probs")}
        assert np.allclose(x.get("probs", []), y.get("probs", []), rtol=0, atol=1e-5)


def test_runtime_info_lists_the_remote_devices(workers):
    _, eps = workers
    res = subprocess.run([DLLM, "runtime", "info", "--json", "--rpc", eps], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    remote = [d for d in json.loads(res.stdout)["devices"] if d["name"].startswith("RPC")]
    assert len(remote) == 2 and all(d["memory_total"] > 0 for d in remote)


def _one_line_error(res: subprocess.CompletedProcess, *words: str) -> None:
    lines = [x for x in res.stderr.splitlines() if x.strip()]
    assert res.returncode == 1 and res.stdout == "", res.stderr
    assert len(lines) == 1 and all(w in lines[0] for w in words), res.stderr
    assert "Traceback" not in res.stderr


def test_no_worker_on_the_port(model):
    res = _run(model, "--rpc", f"127.0.0.1:{_free_port()}", timeout=60)
    _one_line_error(res, "cannot reach RPC worker", "dllm rpc-server")


@pytest.mark.parametrize("reply", [b"", b"HTTP/1.1 400 Bad Request\r\n\r\n", b"\x04" + b"\x00" * 40])
def test_something_else_on_the_port(model, reply):
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)
    port = srv.getsockname()[1]

    def answer() -> None:
        for _ in range(2):
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            with conn:
                conn.recv(64)
                conn.sendall(reply)
    threading.Thread(target=answer, daemon=True).start()
    try:
        res = _run(model, "--rpc", f"127.0.0.1:{port}", timeout=60)
    finally:
        srv.close()
    _one_line_error(res, "RPC worker")


def test_a_worker_killed_mid_run_is_one_line(tmp_path):
    from converters import convert
    from dllm_cli.demo.checkpoint import tiny_config, write_checkpoint
    # a flat head: about one token per forward, so a 4000-token answer is still running when the worker dies
    write_checkpoint(tmp_path / "ckpt", tiny_config(), seed=5, head_scale=0.3)
    model = convert(tmp_path / "ckpt", tmp_path / "flat-f32.gguf", outtype="f32").path
    port = _free_port()
    worker = subprocess.Popen([DLLM, "rpc-server", "--port", str(port), "--threads", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait(rpc.Endpoint("127.0.0.1", port))
        trace = tmp_path / "t.jsonl"
        run = subprocess.Popen([DLLM, "run", str(model), "Tell me about the fox.", "--raw", "--max-tokens", "4000",
                                "--ctx-size", "4096", "--mode", "quality", "--threads", "1", "--rpc",
                                f"127.0.0.1:{port}", "-ngl", "3", "--trace", str(trace)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
        t0 = time.monotonic()
        while not part_size(trace) and run.poll() is None and time.monotonic() - t0 < 60:
            time.sleep(0.05)
        worker.send_signal(signal.SIGKILL)
        out, err = run.communicate(timeout=60)
    finally:
        worker.kill()
        worker.wait()
    res = subprocess.CompletedProcess(run.args, run.returncode, "", err)
    _one_line_error(res, "RPC worker")
    assert not part_files(trace) and not trace.exists()


def test_rpc_server_stops_cleanly_on_sigterm():
    from dllm_cli.runtime.library import candidates
    if not candidates("cpu"):
        pytest.skip("no runtime built from the current patches (run `dllm runtime build`)")
    port = _free_port()
    p = subprocess.Popen([DLLM, "rpc-server", "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    _wait(rpc.Endpoint("127.0.0.1", port))
    taken = subprocess.run([DLLM, "rpc-server", "--port", str(port)], capture_output=True, text=True, timeout=60)
    _one_line_error(taken, "cannot listen", "--port")
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=20)
    assert p.returncode in (130, 143) and out == "" and "Traceback" not in err
