"""Bad arguments and input: a lone argument is a model only if it names one, huge arguments are never echoed
whole, input is bounded by the context before it is read whole, and malformed ``--replay``, ``--compare`` and
``--prompts`` files are one line naming the file and line."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pytest

from dllm_cli.errors import ContextFullError
from io_helpers import (DLLM, _doc_edit, _edit, _good_doc, _good_trace, dllm, one_line, run_cli,
                        runtime_or_skip, tiny)  # noqa: F401  (tiny is a fixture)


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
