"""``dllm run`` as a shell tool: stdin, --json, --trace, stdout/stderr separation and exit codes."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from io_helpers import part_files, part_text

DLLM = str(Path(sys.executable).with_name("dllm"))


@pytest.fixture(scope="module")
def gguf(tmp_path_factory):
    from converters import convert
    from dllm_cli.demo.checkpoint import tiny_config, write_checkpoint

    d = tmp_path_factory.mktemp("runcli")
    write_checkpoint(d / "ckpt", tiny_config(), seed=7, head_scale=4.0)
    return str(convert(d / "ckpt", d / "tiny-f32.gguf", outtype="f32").path)


def dllm(*args, input=None, env=None, timeout=120):
    e = dict(os.environ, **(env or {}))
    return subprocess.run([DLLM, *args], input=input, capture_output=True, timeout=timeout, env=e)


def test_json_document_schema_and_values(gguf):
    r = dllm("run", gguf, "Sort 3 1 2", "--json", "--max-tokens", "40", "--mode", "speed", input=b"")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)  # exactly one JSON document on stdout
    for key in ("text", "tokens", "prompt_tokens", "finish_reason", "mode", "params", "forwards", "tpf",
                "edits", "elapsed_s", "tps"):
        assert key in doc, key
    assert doc["mode"] == "speed" and doc["params"]["threshold"] == 0.5 and doc["params"]["editing_threshold"] == 0.0
    assert 0 < len(doc["tokens"]) <= 40 and doc["finish_reason"] in ("eos", "length")
    assert doc["tpf"] == pytest.approx(len(doc["tokens"]) / doc["forwards"], abs=1e-3)
    assert all(isinstance(t, int) for t in doc["prompt_tokens"]) and len(doc["prompt_tokens"]) > 5


def test_stdin_is_joined_after_the_argument_and_runs_are_deterministic(gguf):
    a = dllm("run", gguf, "Sort", "--json", "--max-tokens", "32", input=b"3 1 2")
    b = dllm("run", gguf, "-", "--json", "--max-tokens", "32", input=b"Sort\n3 1 2")
    c = dllm("run", gguf, "--json", "--max-tokens", "32", input=b"something else entirely")
    da, db, dc = (json.loads(x.stdout) for x in (a, b, c))
    assert da["prompt_tokens"] == db["prompt_tokens"] and da["tokens"] == db["tokens"]
    assert dc["prompt_tokens"] != da["prompt_tokens"]


def test_stdout_carries_only_the_answer(gguf):
    r = dllm("run", gguf, "hello", "--max-tokens", "32", input=b"")
    assert r.returncode == 0
    doc = json.loads(dllm("run", gguf, "hello", "--max-tokens", "32", "--json", input=b"").stdout)
    assert r.stdout.decode().rstrip("\n") == doc["text"].rstrip("\n")
    assert b"llama" not in r.stderr and b"load" not in r.stderr  # llama.cpp's log stays quiet


def test_trace_is_replayable_jsonl(gguf, tmp_path):
    trace = tmp_path / "t.jsonl"
    r = dllm("run", gguf, "hi", "--trace", str(trace), "--max-tokens", "32", "--json", input=b"")
    assert r.returncode == 0
    from dllm_cli.decoding.events import event_from_dict

    events = [event_from_dict(json.loads(line)) for line in trace.read_text().splitlines()]
    assert events[0].kind == "start" and events[-1].kind == "done"
    assert list(events[-1].ids) == json.loads(r.stdout)["tokens"]
    assert not part_files(trace)


def test_non_utf8_stdin_is_replaced_with_a_warning(gguf):
    r = dllm("run", gguf, "--max-tokens", "32", "--json", input=b"caf\xe9 \xff ok")
    assert r.returncode == 0
    assert b"not valid UTF-8" in r.stderr


@pytest.mark.parametrize("args,code,needle", [
    (["--threshold", "1.5"], 2, "--threshold must be in [0, 1]"),
    (["--editing-threshold", "-0.1"], 2, "--editing-threshold must be in [0, 1]"),
    (["--mode", "turbo"], 2, "turbo"),
    (["--top-p", "0"], 2, "--top-p"),
])
def test_bad_options_exit_2(gguf, args, code, needle):
    r = dllm("run", gguf, "hi", *args, input=b"")
    assert r.returncode == code and needle in r.stderr.decode()
    assert r.stdout == b"" and b"Traceback" not in r.stderr


def test_empty_prompt_and_missing_model(gguf, tmp_path):
    r = dllm("run", gguf, "   ", input=b"")
    assert r.returncode == 2 and b"prompt is empty" in r.stderr and r.stdout == b""
    r = dllm("run", str(tmp_path / "nope.gguf"), "hi", input=b"")
    assert r.returncode == 1 and b"model file not found" in r.stderr
    assert len(r.stderr.decode().strip().splitlines()) == 1


def test_prompt_longer_than_the_context(gguf):
    r = dllm("run", gguf, "word " * 400, "--ctx-size", "64", input=b"")
    assert r.returncode == 1 and b"context holds 64" in r.stderr and b"--ctx-size" in r.stderr


def test_corrupt_and_foreign_ggufs(tmp_path, gguf):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(Path(gguf).read_bytes()[:5000])
    r = dllm("run", str(bad), "hi", input=b"")
    assert r.returncode == 1 and (b"truncated" in r.stderr or b"corrupt" in r.stderr)
    import gguf as gg

    w = gg.GGUFWriter(str(tmp_path / "llama.gguf"), "llama")
    w.add_block_count(1)
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_ti_data_to_file(); w.close()
    r = dllm("run", str(tmp_path / "llama.gguf"), "hi", input=b"")
    assert r.returncode == 1 and b"architecture 'llama'" in r.stderr


def test_sigint_exits_130_and_json_prints_nothing(tmp_path_factory, tmp_path):
    from converters import convert
    from dllm_cli.demo.checkpoint import tiny_config, write_checkpoint

    d = tmp_path_factory.mktemp("sigint")
    write_checkpoint(d / "ckpt", tiny_config(), seed=7, head_scale=10.0)  # this seed runs to max-tokens
    model = str(convert(d / "ckpt", d / "long.gguf", outtype="f32").path)
    trace = tmp_path / "t.jsonl"
    p = subprocess.Popen([DLLM, "run", model, "go", "--json", "--max-tokens", "3000", "--ctx-size", "4096",
                          "--mode", "speed", "--trace", str(trace)],
                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and p.poll() is None:
        if part_text(trace).count("\n") >= 3:  # generation is under way
            break
        time.sleep(0.05)
    assert p.poll() is None, "the run ended before it could be interrupted"
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    assert out == b""  # an interrupted --json run prints nothing partial
    assert not part_files(trace) and not trace.exists()  # and leaves no half-written trace
