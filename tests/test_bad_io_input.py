"""Bad output paths, failing writes, closed pipes, odd arguments, oversized input and malformed files: each is
one line on stderr naming the file (or a quiet end, for a closed pipe), never an internal error or a traceback,
and never a leftover ``.part`` file."""
from __future__ import annotations

import errno
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dllm_cli import outfiles
from dllm_cli.cli.app import main
from dllm_cli.errors import ContextFullError, ConvertError, DllmError, OutputError

DLLM = str(Path(sys.executable).with_name("dllm"))
WRITE_ERRNOS = [errno.EACCES, errno.EROFS, errno.ENOSPC, errno.EISDIR, errno.EPIPE, errno.ENOENT, errno.EDQUOT,
                errno.EIO]


def run_cli(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["dllm", *map(str, args)])
    with pytest.raises(SystemExit) as ex:
        main()
    cap = capsys.readouterr()
    return ex.value.code, cap.out, cap.err


def dllm(*args, input: bytes | None = b"", env: dict | None = None, timeout: float = 300):
    return subprocess.run([DLLM, *map(str, args)], input=input, capture_output=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def one_line(err: str | bytes, *needles: str) -> None:
    text = err.decode() if isinstance(err, bytes) else err
    assert text.count("\n") == 1 and text.startswith("error: "), text
    assert "internal error" not in text and "Traceback" not in text, text
    for n in needles:
        assert n in text, (n, text)


def no_part_files(*dirs: Path) -> bool:
    return not any(p.name.endswith(".part") for d in dirs for p in d.rglob("*"))


def runtime_or_skip() -> None:
    from dllm_cli.errors import RuntimeMissingError
    from dllm_cli.runtime.library import check

    try:
        check()
    except RuntimeMissingError as e:
        pytest.skip(f"patched runtime not built: {e}")


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
    with pytest.raises(OutputError, match="1000|0.0 MB free"):
        outfiles.check(tmp_path / "x.gguf", need_bytes=10_000)
    outfiles.check(tmp_path / "x.gguf", need_bytes=10)


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


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from converters import convert
    from dllm_cli.demo.checkpoint import tiny_config, write_checkpoint

    d = tmp_path_factory.mktemp("badio")
    write_checkpoint(d / "ckpt", tiny_config(), seed=7, head_scale=4.0)
    return str(convert(d / "ckpt", d / "tiny-f32.gguf", outtype="f32").path)


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


# ------------------------------------------------------------------ arguments


@pytest.mark.parametrize("arg", ["What is 1/2?", "a </b> tag", "1/2", "see /etc/passwd?", "x/y/z", "</s>",
                                 "~nouser-xyz/what", "x" * 100_000, "nul\0byte", "missing.gguf", "dir/missing.gguf"])
def test_a_lone_argument_is_the_prompt_unless_it_names_a_model(arg):
    from dllm_cli.cli.run_cmd import split_args

    assert split_args(arg, None) == (None, arg)


def test_a_lone_argument_that_names_a_model_is_the_model(tmp_path):
    from dllm_cli.cli.run_cmd import split_args

    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF")
    for name in (str(f), "demo", "llada2.1-mini"):
        assert split_args(name, None) == (name, None)
    assert split_args("-", None) == (None, "-")


@pytest.mark.parametrize("prompt", ["What is 1/2?", "a </b> b", "x/y"])
def test_run_answers_prompts_with_slashes(prompt):
    runtime_or_skip()
    r = dllm("run", prompt, "-n", "8")
    assert r.returncode == 0 and r.stdout.strip() and r.stderr == b"", r.stderr


@pytest.mark.parametrize("args", [["chat", "x" * 100_000], ["convert", "x" * 100_000], ["chat", "a/" * 50_000],
                                  ["run", "x" * 100_000, "hi"], ["models", "show", "x" * 100_000],
                                  ["chat", "--replay", "x" * 100_000]])
def test_huge_arguments_are_never_echoed_whole(args, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"")))
    code, out, err = run_cli(monkeypatch, capsys, *args)
    assert code in (1, 2) and out == ""
    one_line(err)
    assert len(err) < 700


def test_a_huge_prompt_is_refused_by_the_context_not_stat(tiny):
    runtime_or_skip()
    for text in ("x" * 100_000, "word " * 20_000):  # one 100,000-character word used to crash the tokenizer
        r = dllm("run", tiny, text, "--ctx-size", "64")
        assert r.returncode == 1 and r.stdout == b""
        one_line(r.stderr, "context")
        assert len(r.stderr) < 700


# ------------------------------------------------------------------ input size


class CountingStdin:
    """A bottomless stdin that records how much was asked for."""

    def __init__(self) -> None:
        self.asked = 0
        self.buffer = self

    def read(self, n: int = -1) -> bytes:
        assert n >= 0, "stdin must never be read whole"
        self.asked += n
        return b"a" * n

    def isatty(self) -> bool:
        return False

    closed = False


@pytest.mark.parametrize("ctx", [32, 64, 4096])
def test_stdin_is_read_at_most_one_byte_past_the_bound(monkeypatch, ctx):
    from dllm_cli.cli.run_cmd import gather_prompt, input_bound

    stdin = CountingStdin()
    monkeypatch.setattr(sys, "stdin", stdin)
    with pytest.raises(ContextFullError, match=f"{ctx}-token context"):
        gather_prompt("-", None, ctx)
    assert stdin.asked == input_bound(ctx) + 1


@pytest.mark.parametrize("source", ["/dev/zero", "/dev/urandom"])
def test_a_bottomless_file_is_refused(source, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"")))
    code, out, err = run_cli(monkeypatch, capsys, "run", "/nonexistent.gguf", "hi", "--file", source,
                             "--ctx-size", "64")
    assert (code, out) == (1, "")
    one_line(err, "--file", "64-token context")


def test_a_file_that_fits_is_read_whole(tmp_path, monkeypatch):
    from dllm_cli.cli.run_cmd import gather_prompt, input_bound

    f = tmp_path / "p.txt"
    f.write_bytes(b"b" * input_bound(64))
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"")))
    assert gather_prompt(None, f, 64) == "b" * input_bound(64)


# ------------------------------------------------------------------ malformed --replay and --compare files


def _good_trace() -> list[dict]:
    from dllm_cli.decoding.events import BlockEvent, DoneEvent, StartEvent, StepEvent

    return [e.to_dict() for e in (
        StartEvent(5, 0, 4, 9, 1, 3, {"mode": "speed", "stop_ids": [1]}),
        StepEvent(1, 0, 4, (9, 2, 3, 9), (1, 2), (), (0.9, 0.8), 1, 0, 2, 0.01),
        BlockEvent(1, (2, 3), "ab", 1, 0.02), DoneEvent((2, 3), "ab", 5, "eos", 1, 0, 1, 0, 2.0, 0.03))]


def _edit(i: int, **changes) -> bytes:
    lines = _good_trace()
    lines[i].update(changes)
    return "\n".join(json.dumps(x) for x in lines).encode()


MALFORMED_TRACES = {
    "empty": b"", "blank lines": b"\n\n  \n", "binary": b"\xff\xfe\x00\x01garbage\n", "a list": b"[1, 2]\n",
    "a number": b"42\n", "no event": b'{"x": 1}\n', "unknown event": b'{"event": "boom"}\n',
    "truncated last line": "\n".join(json.dumps(x) for x in _good_trace()).encode()[:-15],
    "canvas a string": _edit(1, canvas="abc"), "probs missing": _edit(1, probs=None) .replace(b'"probs": null, ', b""),
    "negative id": _edit(1, canvas=[9, -2, 3, 9]), "position outside": _edit(1, unmasked=[7]),
    "bad edit triple": _edit(1, edited=[[0, 1]]), "bool time": _edit(1, elapsed_s=True),
    "nan time": _edit(3, elapsed_s=float("nan")), "huge block": _edit(0, block_length=10**12),
    "config a list": _edit(0, config=[]), "stop ids strings": _edit(0, config={"stop_ids": ["a"]}),
    "pieces a list": _edit(1, pieces=[1]), "pieces bad key": _edit(1, pieces={"x": "a"}),
    "text a number": _edit(2, text=5), "ids nested": _edit(2, ids=[[1]]),
}


@pytest.mark.parametrize("name", list(MALFORMED_TRACES))
def test_malformed_replay_files_are_one_line_naming_the_file(name, tmp_path, monkeypatch, capsys):
    f = tmp_path / "t.jsonl"
    f.write_bytes(MALFORMED_TRACES[name])
    code, out, err = run_cli(monkeypatch, capsys, "chat", "--replay", f, "--speed", "0")
    assert (code, out) == (2, "")
    one_line(err, "t.jsonl")


def test_a_good_trace_still_replays(tmp_path, monkeypatch, capsys):
    f = tmp_path / "t.jsonl"
    f.write_bytes(_edit(0))
    code, out, err = run_cli(monkeypatch, capsys, "chat", "--replay", f, "--speed", "0")
    assert (code, out) == (0, "ab\n"), err


def _good_doc() -> dict:
    row = {"model": "m", "path": "/x/m.gguf", "threads": 2, "test": "pp32", "tps": 10.0, "step_s": {"mean": 0.1}}
    return {"results": [row, {**row, "test": "gen"}], "config": {}}


def _doc_edit(f) -> bytes:
    d = _good_doc()
    f(d)
    return json.dumps(d).encode()


MALFORMED_DOCS = {
    "empty": b"", "binary": b"\x00\xff\xfe", "a list": b"[]", "a string": b'"results"', "no results": b"{}",
    "results an object": b'{"results": {}}', "row a number": b'{"results": [3]}',
    "truncated": json.dumps(_good_doc(), indent=1).encode()[:-20],
    "tps missing": _doc_edit(lambda d: d["results"][0].pop("tps")),
    "tps a string": _doc_edit(lambda d: d["results"][0].update(tps="fast")),
    "tps negative": _doc_edit(lambda d: d["results"][0].update(tps=-1)),
    "threads a string": _doc_edit(lambda d: d["results"][1].update(threads="2")),
    "threads a bool": _doc_edit(lambda d: d["results"][0].update(threads=True)),
    "test missing": _doc_edit(lambda d: d["results"][0].pop("test")),
    "no model or path": _doc_edit(lambda d: [r.pop("model") and r.pop("path") for r in d["results"]]),
    "step_s a list": _doc_edit(lambda d: d["results"][0].update(step_s=[1])),
    "step mean a string": _doc_edit(lambda d: d["results"][0].update(step_s={"mean": "x"})),
    "tps infinite": json.dumps(_good_doc()).replace('"tps": 10.0', '"tps": 1e999', 1).encode(),
}


@pytest.mark.parametrize("name", list(MALFORMED_DOCS))
@pytest.mark.parametrize("side", [0, 1])
def test_malformed_compare_files_are_one_line_naming_the_file(name, side, tmp_path, monkeypatch, capsys):
    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    good.write_text(json.dumps(_good_doc()))
    bad.write_bytes(MALFORMED_DOCS[name])
    pair = (bad, good) if side == 0 else (good, bad)
    code, out, err = run_cli(monkeypatch, capsys, "bench", "--compare", pair[0], "--compare", pair[1])
    assert (code, out) == (2, "")
    one_line(err, "bad.json")


def test_good_compare_files_still_compare(tmp_path, monkeypatch, capsys):
    good = tmp_path / "good.json"
    good.write_text(json.dumps(_good_doc()))
    code, out, err = run_cli(monkeypatch, capsys, "bench", "--compare", good, "--compare", good, "--json")
    assert code == 0 and len(json.loads(out)["rows"]) == 2, err


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


@pytest.mark.parametrize("source,needle", [("/dev/zero", "longer than"), ("/dev/urandom", "UTF-8")])
def test_bottomless_replay_files_are_refused_without_reading_them_whole(source, needle, monkeypatch, capsys):
    code, out, err = run_cli(monkeypatch, capsys, "chat", "--replay", source)
    assert (code, out) == (2, "")
    one_line(err, source, needle)


MALFORMED_PROMPTS = {
    "empty.txt": b"", "blank.txt": b"\n \n", "binary.txt": b"\xff\xfe\x00", "list.jsonl": b"[1]\n",
    "no prompt.jsonl": b'{"name": "a"}\n', "prompt a number.jsonl": b'{"prompt": 5}\n',
    "truncated.jsonl": b'{"prompt": "a"}\n{"prompt": "b', "empty prompt.jsonl": b'{"prompt": "  "}\n',
}


@pytest.mark.parametrize("name", list(MALFORMED_PROMPTS))
def test_malformed_prompt_files_are_one_line_naming_the_file(name, tmp_path, monkeypatch, capsys):
    f = tmp_path / name
    f.write_bytes(MALFORMED_PROMPTS[name])
    code, out, err = run_cli(monkeypatch, capsys, "bench", tmp_path / "never-loaded.gguf", "--prompts", f)
    assert (code, out) == (2, "")
    one_line(err, name)


def test_a_piped_chat_line_longer_than_the_context_is_skipped_not_read_whole(tiny):
    runtime_or_skip()
    huge = b"a" * 300_000  # more than a 4096-token context can hold (64 bytes per token)
    r = dllm("chat", tiny, "--no-live", "-n", "8", "--ctx-size", "4096",
             input=b"first\n" + huge + b"\n" + huge + b"\nlast\n")
    assert r.returncode == 0, r.stderr
    lines = r.stderr.decode().splitlines()
    assert sum("cannot fit the context; it was skipped" in ln for ln in lines) == 2, lines
    assert b"Traceback" not in r.stderr and b"internal error" not in r.stderr


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


@pytest.mark.parametrize("args", [["run", "TINY", "hi", "-n", "4"], ["run", "TINY", "-", "-n", "4"], ["chat", "TINY"]])
def test_a_closed_stdin_reads_as_empty(args, tiny):
    runtime_or_skip()
    r = subprocess.run([DLLM, *[tiny if a == "TINY" else a for a in args]], capture_output=True, timeout=300,
                       preexec_fn=lambda: os.close(0))
    assert b"internal error" not in r.stderr and b"Traceback" not in r.stderr, r.stderr
    assert r.returncode == (2 if "-" in args else 0), r.stderr  # `-` with nothing on stdin: the prompt is empty


@pytest.mark.parametrize("args,needle", [(["--synthetic", "llada2-mini", "--quant", "q3_bogus"], "--quant"),
                                         (["--quality-vs", "missing-ref.gguf"], "missing-ref.gguf")])
def test_bench_refuses_late_options_before_measuring(args, needle, tmp_path, monkeypatch, capsys):
    from dllm_cli.bench import measure

    monkeypatch.setattr(measure, "run_benchmark", lambda *a, **k: pytest.fail("measured before checking"))
    code, out, err = run_cli(monkeypatch, capsys, "bench", *args)
    assert code in (1, 2) and out == ""
    one_line(err, needle)
