"""Every output path goes through ``dllm_cli.outfiles``: bad paths are refused before the work, every write
error is one line naming the path, cleanup never raises, a closed or full stdout ends the run cleanly and a
broken stderr never changes the outcome; a failed ``/save`` keeps the chat going."""
from __future__ import annotations

import errno
import io
import json
import os
import subprocess
from pathlib import Path

import pytest

from dllm_cli import outfiles
from dllm_cli.errors import ConvertError, DllmError, OutputError
from io_helpers import (DLLM, WRITE_ERRNOS, _edit, _good_doc, dllm, no_part_files, one_line, run_cli,
                        runtime_or_skip, tiny)  # noqa: F401  (tiny is a fixture)


# ------------------------------------------------------------------ outfiles: the helper every output goes through


@pytest.mark.parametrize("code", WRITE_ERRNOS)
@pytest.mark.parametrize("where", ["open", "write", "rename"])
def test_every_write_error_is_one_line_naming_the_path_and_leaves_nothing(tmp_path, monkeypatch, code, where):
    target = tmp_path / "out.json"
    real_open, real_replace = open, os.replace

    class Failing(io.StringIO):
        def write(self, s):  # type: ignore[override]
            raise OSError(code, os.strerror(code))

    def fake_open(path, *a, **k):
        if str(path).endswith(".part"):
            if where == "open":
                raise OSError(code, os.strerror(code), str(path))
            if where == "write":
                real_open(path, *a, **k).close()  # the file exists, as it would
                return Failing()
        return real_open(path, *a, **k)

    def fake_replace(a, b):
        if where == "rename":
            raise OSError(code, os.strerror(code))
        return real_replace(a, b)

    monkeypatch.setattr("builtins.open", fake_open)
    monkeypatch.setattr(os, "replace", fake_replace)
    with pytest.raises(OutputError) as e:
        outfiles.write_text(target, "data", what="the thing")
    msg = str(e.value)
    assert "\n" not in msg and str(target) in msg and msg.startswith("cannot write the thing to ")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("make,needle", [
    (lambda d: d, "it is a directory"),
    (lambda d: d / "missing" / "x.json", "does not exist"),
    (lambda d: (d / "file").write_text("") or d / "file" / "x.json", "not a directory"),
    (lambda d: Path("/dev/null"), "not a regular file"),
    (lambda d: Path("/proc/dllm-x/y.json"), "does not exist"),
])
def test_check_refuses_paths_before_any_work(tmp_path, make, needle):
    with pytest.raises(OutputError, match=needle):
        outfiles.check(make(tmp_path), what="the output")


@pytest.mark.parametrize("read_only,needle", [(True, "read-only"), (False, "permission denied")])
def test_check_refuses_an_unwritable_directory(tmp_path, monkeypatch, read_only, needle):
    monkeypatch.setattr(os, "access", lambda p, mode: False)  # tests run as root: simulate the directory
    monkeypatch.setattr(outfiles, "_read_only", lambda d: read_only)
    with pytest.raises(OutputError, match=needle):
        outfiles.check(tmp_path / "x.gguf")


def test_check_refuses_a_full_disk(tmp_path, monkeypatch):
    monkeypatch.setattr(outfiles, "free_bytes", lambda d: 1000)
    with pytest.raises(OutputError, match="0.0 MB free, it needs 0.0 MB"):
        outfiles.check(tmp_path / "x.gguf", need_bytes=10_000)
    outfiles.check(tmp_path / "x.gguf", need_bytes=10)
    monkeypatch.setattr(outfiles, "free_bytes", lambda d: 0)
    with pytest.raises(OutputError, match="x.gguf: no space left on the device"):
        outfiles.check(tmp_path / "x.gguf")


def test_special_files_are_written_in_place(tmp_path):
    assert outfiles.write_text("/dev/null", "x") == Path("/dev/null")
    with pytest.raises(OutputError, match="no space left"):
        outfiles.write_text("/dev/full", "x" * 100_000)


def test_cleanup_never_raises(tmp_path, monkeypatch):
    def unlink(p):
        raise PermissionError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(os, "unlink", unlink)
    outfiles.remove_quietly(tmp_path / "x.part")
    with pytest.raises(KeyboardInterrupt):  # the original exception survives a cleanup that fails
        with outfiles.atomic(tmp_path / "x") as part:
            part.write_text("partial")
            raise KeyboardInterrupt


def test_convert_cleanup_failing_inside_the_error_handler_is_still_one_error(make_checkpoint, tmp_path, monkeypatch):
    """convert -o into a directory that turns read-only mid-write: the write fails and so does the cleanup."""
    from converters import base, convert

    def chunks(ck, plan):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(base, "tensor_chunks", chunks)
    monkeypatch.setattr(os, "unlink", lambda p: (_ for _ in ()).throw(OSError(errno.EROFS, "Read-only")))
    with pytest.raises(OutputError, match="read-only"):
        convert(make_checkpoint(), tmp_path / "m.gguf")


# ------------------------------------------------------------------ output paths through the real commands


BAD_OUTPUTS = [
    ("a directory", lambda d: d, "is a directory"),
    ("a missing directory", lambda d: d / "missing" / "o.x", "does not exist"),
    ("a file as a directory", lambda d: (d / "f").write_text("") or d / "f" / "o.x", "not a directory"),
    ("/proc", lambda d: Path("/proc/o.x"), "does not accept new files"),
]


@pytest.mark.parametrize("label,make,needle", [b for b in BAD_OUTPUTS if b[0] != "a missing directory"]  # created
                         + [("a device", lambda d: Path("/dev/full"), "regular file")])
def test_convert_output_refused_before_the_work(label, make, needle, make_checkpoint, tmp_path, monkeypatch, capsys):
    out = make(tmp_path)
    code, stdout, err = run_cli(monkeypatch, capsys, "convert", make_checkpoint(), "-o", out)
    assert (code, stdout) == (1, "")
    one_line(err, needle)
    assert no_part_files(tmp_path)


@pytest.mark.parametrize("label,make,needle", BAD_OUTPUTS)
def test_bench_save_refused_before_measuring(label, make, needle, tmp_path, monkeypatch, capsys):
    code, stdout, err = run_cli(monkeypatch, capsys, "bench", tmp_path / "never-loaded.gguf", "--save", make(tmp_path))
    assert (code, stdout) == (1, "")
    one_line(err, needle)


def test_bench_save_failing_at_the_end_keeps_the_measurement(tmp_path, monkeypatch, capsys):
    from dllm_cli.bench import measure

    monkeypatch.setattr(measure, "run_benchmark", lambda paths, cfg, **k: {"results": [], "config": {}})
    monkeypatch.setattr(outfiles, "write_text", lambda *a, **k: (_ for _ in ()).throw(
        OutputError("cannot write the bench document to x.json: no space left on the device")))
    code, stdout, err = run_cli(monkeypatch, capsys, "bench", "--json", "--save", tmp_path / "x.json")
    assert code == 1 and json.loads(stdout) == {"results": [], "config": {}}  # the run is not lost
    one_line(err, "x.json", "no space left")


@pytest.mark.parametrize("home", [lambda d: (d / "f").write_text("") or d / "f", lambda d: Path("/proc/dllm-home")])
def test_unwritable_dllm_home_is_one_line(home, make_checkpoint, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DLLM_HOME", str(home(tmp_path)))
    code, stdout, err = run_cli(monkeypatch, capsys, "convert", make_checkpoint())
    assert (code, stdout) == (1, "")
    one_line(err, "models")
    code, stdout, err = run_cli(monkeypatch, capsys, "bench", "--synthetic", "llada2-mini", "--layers", "1", "-q")
    assert (code, stdout) == (1, "")
    one_line(err, "synthetic")



@pytest.mark.parametrize("label,make,needle", BAD_OUTPUTS)
def test_run_trace_refused_before_the_answer(label, make, needle, tiny, tmp_path):
    runtime_or_skip()
    r = dllm("run", tiny, "hi", "-n", "16", "--trace", make(tmp_path))
    assert (r.returncode, r.stdout) == (1, b"")  # refused before any answer was printed
    one_line(r.stderr, needle)
    assert no_part_files(tmp_path)


def test_run_trace_to_a_full_device_and_json_to_dev_full(tiny, tmp_path):
    runtime_or_skip()
    r = dllm("run", tiny, "hi", "-n", "16", "--trace", "/dev/full")
    assert r.returncode == 1
    one_line(r.stderr, "/dev/full", "no space left")
    with open("/dev/full", "wb") as full:
        r = subprocess.run([DLLM, "run", tiny, "hi", "-n", "16", "--json"], stdin=subprocess.DEVNULL, stdout=full,
                           stderr=subprocess.PIPE, timeout=300)
    assert r.returncode == 1
    one_line(r.stderr, "stdout", "no space left")


@pytest.mark.parametrize("args", [["--json"], [], ["--mode", "speed"]])
def test_a_closed_stdout_ends_quietly_like_a_unix_filter(tiny, args):
    runtime_or_skip()
    p = subprocess.Popen([DLLM, "run", tiny, "Sort 3 1 2", "-n", "3000", "--ctx-size", "4096", *args],
                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdout is not None and p.stderr is not None
    p.stdout.read(1)
    p.stdout.close()  # `| head -c 1`
    err = p.stderr.read()
    p.wait(timeout=300)
    assert err == b"", err
    assert p.returncode in (0, 141)  # 0 when the whole answer fit the pipe before the reader left


# ------------------------------------------------------------------ chat: a failed /save keeps the session


def test_failed_save_in_chat_keeps_the_conversation(tiny, tmp_path):
    runtime_or_skip()
    bad = ["/save /dev/full/x.md", f"/save {tmp_path}/missing/x.md", "/save /proc/x.json", f"/save {tmp_path}/d.md/",
           "/save " + "y" * 5000 + ".md"]
    (tmp_path / "d.md").mkdir()
    good = tmp_path / "t.md"
    script = "\n".join(["first question", *bad, "second question", f"/save {good}"]) + "\n"
    r = dllm("chat", tiny, "--no-live", "-n", "16", input=script.encode())
    assert r.returncode == 0, r.stderr
    lines = r.stderr.decode().splitlines()
    assert sum("cannot write the transcript" in ln for ln in lines) == len(bad), lines
    assert all(len(ln) < 700 for ln in lines) and b"Traceback" not in r.stderr
    text = good.read_text()
    assert "first question" in text and "second question" in text  # both turns survived the failures
    assert no_part_files(tmp_path)


# ------------------------------------------------------------------ messages that name the right fix


@pytest.mark.parametrize("quantized,free,cls,needle", [
    (True, 10**12, ConvertError, "already quantized"),
    (False, 1000, OutputError, "no space left"),
    (False, 0, OutputError, "no space left"),
    (False, 10**12, ConvertError, "DLLM_VERBOSE=1"),
    (False, None, ConvertError, "DLLM_VERBOSE=1"),
])
def test_a_failed_quantization_names_the_real_cause(tmp_path, monkeypatch, quantized, free, cls, needle):
    from dllm_cli.runtime import quantize

    monkeypatch.setattr(quantize, "_quantized", lambda src: quantized)
    monkeypatch.setattr(outfiles, "free_bytes", lambda d: free)
    err = quantize._failure(tmp_path / "src.gguf", tmp_path / "dst.gguf", "q4_k_m")
    assert isinstance(err, cls) and needle in str(err)
    if cls is OutputError:
        assert "dst.gguf" in str(err) and "already quantized" not in str(err)


def test_quantize_checks_free_space_before_starting(tmp_path, monkeypatch, make_gguf):
    from dllm_cli.runtime.quantize import quantize

    src = make_gguf()
    monkeypatch.setattr(outfiles, "free_bytes", lambda d: 10)
    with pytest.raises(OutputError, match="MB free"):
        quantize(src, tmp_path / "q.gguf", "q8_0")
    assert list(tmp_path.iterdir()) == []


def test_errors_are_dllm_errors_not_os_errors():
    assert issubclass(OutputError, DllmError)


@pytest.mark.parametrize("out", ["/", "", ".", "..", "/tmp/"])
@pytest.mark.parametrize("quant", [[], ["--quant", "q8_0"]])
def test_convert_output_that_names_a_directory(out, quant, make_checkpoint, monkeypatch, capsys):
    code, stdout, err = run_cli(monkeypatch, capsys, "convert", make_checkpoint(), "-o", out, *quant)
    assert (code, stdout) == (1, "")
    one_line(err, "is a directory")


STDOUT_COMMANDS = [["models"], ["models", "--json"], ["models", "show", "demo"], ["--version"], ["--help"],
                   ["run", "--help"], ["chat", "--replay", "TRACE", "--speed", "0"],
                   ["bench", "--compare", "DOC", "--compare", "DOC"]]


def _fill(args: list[str], tmp_path: Path) -> list[str]:
    trace, doc = tmp_path / "t.jsonl", tmp_path / "d.json"
    trace.write_bytes(_edit(0))
    doc.write_text(json.dumps(_good_doc()))
    return [str(trace) if a == "TRACE" else str(doc) if a == "DOC" else a for a in args]


@pytest.mark.parametrize("args", STDOUT_COMMANDS)
def test_stdout_on_a_full_device_is_one_line(args, tmp_path):
    with open("/dev/full", "wb") as full:
        r = subprocess.run([DLLM, *_fill(args, tmp_path)], stdin=subprocess.DEVNULL, stdout=full,
                           stderr=subprocess.PIPE, timeout=120)
    assert r.returncode == 1
    one_line(r.stderr, "stdout", "no space left")


@pytest.mark.parametrize("args", [a for a in STDOUT_COMMANDS if "--help" not in a])
def test_a_closed_stdout_is_one_line(args, tmp_path):
    r = subprocess.run([DLLM, *_fill(args, tmp_path)], stdin=subprocess.DEVNULL, stderr=subprocess.PIPE,
                       preexec_fn=lambda: os.close(1), timeout=120)
    assert r.returncode == 1
    one_line(r.stderr, "stdout", "closed")


@pytest.mark.parametrize("args,code", [(["run", "hi", "--seed", "-1"], 2), (["chat", "--replay", "/nonexistent"], 2),
                                       (["models", "show", "nope"], 1), (["STDOUT"], 0)])
@pytest.mark.parametrize("stderr", ["full", "closed"])
def test_a_broken_stderr_does_not_change_the_outcome(args, code, stderr, tmp_path):
    args = ["models", "--json"] if args == ["STDOUT"] else args
    kw: dict = {"preexec_fn": lambda: os.close(2)} if stderr == "closed" else {"stderr": open("/dev/full", "wb")}
    r = subprocess.run([DLLM, *args], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, timeout=120, **kw)
    assert r.returncode == code
    if code == 0:
        assert json.loads(r.stdout)


@pytest.mark.parametrize("path", ["a\0b.md", "/tmp/\0.json"])
def test_a_nul_byte_in_a_save_path_is_one_line(path):
    from dllm_cli.chat import Conversation

    with pytest.raises(OutputError, match="NUL byte"):
        Conversation().save(path)
