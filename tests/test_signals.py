"""SIGTERM and SIGHUP end dllm like Ctrl-C: the partial output is removed, one line goes to stderr, and the exit
code is 128 + the signal (143, 129; Ctrl-C stays 130). Real processes, interrupted mid-work."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from io_helpers import part_files, part_size, part_text  # noqa: F401

DLLM = str(Path(sys.executable).with_name("dllm"))
SIGNALS = [(signal.SIGTERM, 143, "terminated"), (signal.SIGHUP, 129, "hangup")]
WITH_INT = SIGNALS + [(signal.SIGINT, 130, "interrupted")]


def runtime_or_skip() -> None:
    from dllm_cli.errors import RuntimeMissingError
    from dllm_cli.runtime.library import check

    try:
        check()
    except RuntimeMissingError as e:
        pytest.skip(f"patched runtime not built: {e}")


def start(*args: str) -> subprocess.Popen:
    return subprocess.Popen([DLLM, *args], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def wait_for(p: subprocess.Popen, ready, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and p.poll() is None:
        if ready():
            return
        time.sleep(0.02)
    assert p.poll() is None, f"the process ended before {what}: {p.communicate()[1][-500:]!r}"
    raise AssertionError(f"timed out waiting for {what}")


def stop(p: subprocess.Popen, sig: int) -> tuple[int, bytes, bytes]:
    p.send_signal(sig)
    out, err = p.communicate(timeout=120)
    return p.returncode, out, err


def assert_ended(code: int, out: bytes, err: bytes, expect: int, word: str) -> None:
    assert code == expect, err
    assert out == b""
    assert err.decode().splitlines() == [word], err  # one line, no traceback


def size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


@pytest.fixture(scope="module")
def slow_checkpoint(tmp_path_factory):
    """A tiny-architecture checkpoint big enough (~270 MB) that converting it takes a few seconds."""
    from dllm_cli.demo.checkpoint import tiny_config, write_checkpoint

    d = tmp_path_factory.mktemp("slow") / "ckpt"
    write_checkpoint(d, tiny_config(hidden_size=512, moe_intermediate_size=512, head_dim=128, intermediate_size=1024,
                                    num_hidden_layers=6, num_experts=16), seed=3)
    return d


@pytest.mark.parametrize("sig,code,word", SIGNALS)
def test_convert_interrupted_leaves_no_part_file(slow_checkpoint, tmp_path, sig, code, word):
    out = tmp_path / "out" / "m.gguf"
    out.parent.mkdir()
    p = start("convert", str(slow_checkpoint), "-o", str(out), "--outtype", "q8_0")
    wait_for(p, lambda: part_size(out) > 1_000_000, "the .part file grew")
    assert_ended(*stop(p, sig), code, word)
    assert list(out.parent.iterdir()) == []


@pytest.fixture(scope="module")
def f32_gguf(tmp_path_factory):
    from converters import convert
    from dllm_cli.demo.checkpoint import tiny_config, write_checkpoint

    d = tmp_path_factory.mktemp("quantsig")
    # hidden = heads x head_dim (4 x 128): the runtime's checks refuse, before quantizing, a file it could not load
    write_checkpoint(d / "ckpt", tiny_config(hidden_size=512, moe_intermediate_size=512, head_dim=128,
                                             intermediate_size=1024, num_experts=16), seed=2)
    return convert(d / "ckpt", d / "m-f32.gguf", outtype="f32").path


@pytest.mark.parametrize("sig,code,word", SIGNALS)
@pytest.mark.parametrize("when", ["staging", "writing"])
def test_quantize_interrupted_leaves_nothing(f32_gguf, tmp_path, sig, code, word, when):
    """Interrupted before llama.cpp created its file or while it writes: the output directory stays empty."""
    runtime_or_skip()
    outdir = tmp_path / "out"
    outdir.mkdir()
    p = start("convert", str(f32_gguf), "--quant", "q4_k_m", "-o", str(outdir / "q.gguf"))

    def staged(min_bytes: int) -> bool:
        return any(size(f) >= min_bytes for d in outdir.glob(".q.gguf.*.part") for f in [d / "q.gguf"]) \
            or (min_bytes == 0 and any(outdir.glob(".q.gguf.*.part")))

    wait_for(p, lambda: staged(0 if when == "staging" else 1_000_000), f"quantization {when}")
    assert_ended(*stop(p, sig), code, word)
    time.sleep(0.5)  # a C call still running must not create anything after the exit either
    assert list(outdir.iterdir()) == []


@pytest.mark.parametrize("sig,code,word", SIGNALS)
def test_checkpoint_to_quant_interrupted_leaves_nothing(slow_checkpoint, tmp_path, sig, code, word):
    runtime_or_skip()
    outdir = tmp_path / "out"
    outdir.mkdir()
    p = start("convert", str(slow_checkpoint), "--quant", "q8_0", "-o", str(outdir / "q.gguf"))
    wait_for(p, lambda: any(size(f) > 1_000_000 for f in outdir.glob(".dllm-quant-*/*")), "the bf16 stage")
    assert_ended(*stop(p, sig), code, word)
    assert list(outdir.iterdir()) == []


@pytest.fixture(scope="module")
def long_model(tmp_path_factory):
    from converters import convert
    from dllm_cli.demo.checkpoint import tiny_config, write_checkpoint

    d = tmp_path_factory.mktemp("sigrun")
    write_checkpoint(d / "ckpt", tiny_config(), seed=7, head_scale=10.0)  # this seed runs to max-tokens
    return str(convert(d / "ckpt", d / "long.gguf", outtype="f32").path)


@pytest.mark.parametrize("sig,code,word", WITH_INT)
def test_run_trace_interrupted_leaves_no_part_file(long_model, tmp_path, sig, code, word):
    runtime_or_skip()
    trace = tmp_path / "t.jsonl"
    p = start("run", long_model, "go", "--json", "--max-tokens", "3000", "--ctx-size", "4096", "--mode", "speed",
              "--trace", str(trace))
    wait_for(p, lambda: part_text(trace).count("\n") >= 3, "generation started")
    assert_ended(*stop(p, sig), code, word)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("sig,code,word", SIGNALS)
def test_chat_ends_on_term_instead_of_stopping_the_turn(long_model, tmp_path, sig, code, word):
    """Ctrl-C stops one answer and chat goes on; TERM/HUP end the session (and its cleanup runs)."""
    runtime_or_skip()
    p = subprocess.Popen([DLLM, "chat", long_model, "--no-live", "--max-tokens", "3000", "--ctx-size", "4096",
                          "--mode", "speed"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdin is not None
    p.stdin.write(b"go\n")
    p.stdin.flush()  # stdin stays open: without the signal, chat would wait for the next line
    time.sleep(3)
    assert p.poll() is None
    p.send_signal(sig)
    out, err = p.communicate(timeout=120)
    assert p.returncode == code, err
    assert err.decode().strip().splitlines()[-1] == word and b"Traceback" not in err


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGHUP, 129), (signal.SIGINT, 130)])
def test_a_signal_inside_a_ctypes_callback_is_not_lost(sig, code):
    """llama.cpp calls back into Python (its log); an interrupt raised there is swallowed by ctypes. It must still
    arrive once the C call has returned, with no "Exception ignored" noise."""
    script = textwrap.dedent(f"""
        import ctypes, ctypes.util, os, signal, sys, time
        from dllm_cli import signals
        signals.install()
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        CMP = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_int))
        sent = []
        def cmp(a, b):  # runs inside libc's qsort, like llama.cpp's log callback inside a C call
            if not sent:
                sent.append(1)
                os.kill(os.getpid(), {int(sig)})
            return a[0] - b[0]
        arr = (ctypes.c_int * 64)(*range(64, 0, -1))
        try:
            libc.qsort(arr, 64, ctypes.sizeof(ctypes.c_int), CMP(cmp))
            for _ in range(200):  # the program goes on after the C call; the interrupt must arrive
                time.sleep(0.01)
            print("not delivered")
        except KeyboardInterrupt:
            print("delivered", signals.exit_code())
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == f"delivered {code}", (r.stdout, r.stderr)
    assert "Exception ignored" not in r.stderr, r.stderr
