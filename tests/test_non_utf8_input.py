"""Bytes that are not UTF-8 (issue 24, class 3). One rule per kind of input:

* text (prompt argument, ``--system``, ``--file``, stdin, chat lines typed or piped): every undecodable byte
  becomes U+FFFD, with one warning naming the input; the run goes on;
* paths (model argument, ``DLLM_MODEL``, ``DLLM_HOME``, ``-o``, ``--trace``): used as the bytes given;
* template output: a template that renders lone surrogates is refused in one line naming the file;
* an ASCII-only stdout never crashes: text gets ``?``, ``--json`` escapes (and stays lossless).
"""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dllm_cli import text
from dllm_cli.errors import ModelError
from io_helpers import runtime_or_skip

DLLM = os.fsencode(str(Path(sys.executable).with_name("dllm")))
BAD = [b"\xff", b"caf\xe9", b"\xc3", b"\xed\xa0\x80", b"\x80\x80abc"]  # lone, latin-1, cut, encoded surrogate, ...
WARNING = b"not valid UTF-8; undecodable bytes were replaced with U+FFFD"


def run(*args: bytes | str, input: bytes = b"", env: dict | None = None) -> subprocess.CompletedProcess:
    argv = [DLLM, *(a if isinstance(a, bytes) else os.fsencode(a) for a in args)]
    environ = {os.fsencode(k): v if isinstance(v, bytes) else os.fsencode(v)
               for k, v in {**os.environ, **(env or {})}.items()}
    return subprocess.run(argv, input=input, capture_output=True, timeout=120, env=environ)


def clean_exit(r: subprocess.CompletedProcess) -> None:
    assert r.returncode == 0, r.stderr
    assert b"internal error" not in r.stderr and b"Traceback" not in r.stderr, r.stderr


@pytest.fixture(scope="module")
def demo_copy(tmp_path_factory) -> Path:
    """The demo model at a path that is not UTF-8."""
    from dllm_cli.registry import embedded_model_path as demo_path

    d = tmp_path_factory.mktemp("paths")
    dst = Path(os.fsdecode(os.fsencode(str(d)) + b"/m\xff\xfe.gguf"))
    shutil.copyfile(demo_path(), dst)
    return dst


# ------------------------------------------------------------------ the rule, as a library function


@pytest.mark.parametrize("raw", BAD)
def test_clean_replaces_each_undecodable_byte_and_warns_once(raw):
    warned: list[str] = []
    s = os.fsdecode(b"ok " + raw)
    out = text.clean(s, "the thing", warned.append)
    assert out.encode("utf-8") and "\ufffd" in out and out.startswith("ok ")
    assert warned == ["the thing is not valid UTF-8; undecodable bytes were replaced with U+FFFD"]


def test_clean_leaves_valid_text_alone():
    warned: list[str] = []
    assert text.clean("café \ufffd ok", "x", warned.append) == "café \ufffd ok" and warned == []


# ------------------------------------------------------------------ text inputs: replaced with a warning


@pytest.mark.parametrize("raw", BAD[2:])
def test_run_prompt_argument(raw):
    runtime_or_skip()
    r = run("run", b"What is 2 + 3?" + raw)
    clean_exit(r)
    assert WARNING in r.stderr and b"the prompt argument" in r.stderr and r.stdout.strip()


@pytest.mark.parametrize("raw", BAD[:2])
@pytest.mark.parametrize("command", ["run", "chat"])
def test_system_prompt(raw, command):
    runtime_or_skip()
    args = ["run", "What is 2 + 3?"] if command == "run" else ["chat"]
    r = run(*args, "--system", b"Be brief " + raw, input=b"What is 2 + 3?\n" if command == "chat" else b"")
    clean_exit(r)
    assert WARNING in r.stderr and b"--system" in r.stderr and r.stdout.strip()


@pytest.mark.parametrize("raw", BAD[1:3])
def test_piped_chat_lines_warn_and_the_chat_goes_on(raw):
    runtime_or_skip()
    r = run("chat", input=b"Sort: 5 2 9" + raw + b"\nWhat is 2 + 3?\n")
    clean_exit(r)
    assert r.stderr.count(WARNING) == 1 and b"the chat line" in r.stderr
    assert len([x for x in r.stdout.decode().splitlines() if x.strip()]) >= 2  # the next line was answered too


@pytest.mark.parametrize("raw", BAD[3:])
def test_prompt_file_and_stdin(raw, tmp_path):
    runtime_or_skip()
    f = tmp_path / "p.txt"
    f.write_bytes(b"What is 2 + 3?" + raw)
    clean_exit(r := run("run", "--file", str(f)))
    assert WARNING in r.stderr
    clean_exit(r := run("run", "-", input=b"What is 2 + 3?" + raw))
    assert WARNING in r.stderr


# ------------------------------------------------------------------ paths: used as the bytes given


def test_model_path_argument_and_dllm_model(demo_copy):
    runtime_or_skip()
    for r in (run("run", os.fsencode(demo_copy), "What is 2 + 3?"),
              run("run", "What is 2 + 3?", env={"DLLM_MODEL": os.fsencode(demo_copy)})):
        clean_exit(r)
        assert r.stdout.strip() == b"5" and WARNING not in r.stderr


def test_dllm_home_and_output_paths(tmp_path):
    runtime_or_skip()
    home = os.fsencode(str(tmp_path)) + b"/home\xff"
    trace = os.fsencode(str(tmp_path)) + b"/t\xe9.jsonl"
    r = run("run", "What is 2 + 3?", "--trace", trace, env={"DLLM_HOME": home})
    clean_exit(r)
    assert os.path.getsize(trace) > 0
    r = run("chat", input=b"What is 2 + 3?\n/save " + os.fsencode(str(tmp_path)) + b"/c\xff.md\n",
            env={"DLLM_HOME": home})
    clean_exit(r)
    assert b"What is 2 + 3?" in open(os.fsencode(str(tmp_path)) + b"/c\xff.md", "rb").read()


def test_missing_non_utf8_model_path_is_one_line(tmp_path):
    r = run("run", os.fsencode(str(tmp_path)) + b"/no\xff.gguf", "hi")
    assert r.returncode == 1 and r.stderr.count(b"\n") == 1 and b"not found" in r.stderr


# ------------------------------------------------------------------ template output


@pytest.mark.parametrize("source", [
    "{{ '\\udcff' }}{{ messages[0].content }}",
    "{% for m in messages %}{{ m.content }}{% endfor %}{{ '\\ud800' }}",
])
def test_template_rendering_lone_surrogates_is_refused_naming_the_file(source):
    from dllm_cli.runtime.template import ChatTemplate

    with pytest.raises(ModelError) as e:
        ChatTemplate(source, Path("/models/m.gguf")).render([{"role": "user", "content": "hi"}])
    assert "/models/m.gguf" in str(e.value) and "not valid Unicode" in str(e.value)


def test_template_gets_messages_without_surrogates():
    from dllm_cli.runtime.template import ChatTemplate

    out = ChatTemplate("{{ messages[0].content }}", Path("m.gguf")).render([{"role": "user",
                                                                            "content": os.fsdecode(b"a\xffb")}])
    assert out == "a\ufffdb"


# ------------------------------------------------------------------ an ASCII-only stdout


@pytest.mark.parametrize("encoding", ["ascii", "latin-1"])
def test_answers_on_a_narrow_stdout_never_crash(monkeypatch, encoding):
    from dllm_cli.cli import output

    buf = io.BytesIO()
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(buf, encoding=encoding))
    output.text_streams()
    output.answer("café ✓ 日本")
    output.document({"text": "café ✓ 日本"})
    sys.stdout.flush()
    raw = buf.getvalue()
    first, doc = raw.split(b"\n", 1)
    assert first.decode(encoding).startswith("caf")
    assert json.loads(doc.decode("ascii"))["text"] == "café ✓ 日本"  # --json stays lossless


@pytest.mark.parametrize("env", [{"PYTHONIOENCODING": "ascii"}, {"LANG": "C", "LC_ALL": "C", "PYTHONUTF8": "0",
                                                                  "PYTHONCOERCECLOCALE": "0"}])
def test_ascii_stdout_end_to_end(env):
    runtime_or_skip()
    for args, stdin in ((["run", "Describe France.", "--json"], b""), (["chat"], "Copy: café ✓\n".encode()),
                        (["run", "What is 2 + 3?", "--system", "Réponds ✓"], b""), (["models"], b"")):
        r = run(*args, input=stdin, env=env)
        clean_exit(r)
        assert r.stdout.strip()
        if "--json" in args:
            json.loads(r.stdout.decode("ascii"))


@pytest.mark.parametrize("raw", [b"\xff\xfe", b"\x80x", b" \xfe\xfe ok"])  # readline drops a cut sequence itself
def test_typed_chat_lines_warn_and_the_chat_goes_on(raw, tmp_path):
    """On a terminal (readline): the issue's instance, where typing such bytes ended the chat."""
    runtime_or_skip()
    import pty
    import select
    import time

    pid, fd = pty.fork()
    if pid == 0:  # the child: the chat on the pty, its own DLLM_HOME (history)
        os.environ["DLLM_HOME"] = str(tmp_path)
        os.execv(os.fsdecode(DLLM), ["dllm", "chat", "--no-live"])

    def read_until(needle: bytes, timeout: float = 60) -> bytes:
        out, end = b"", time.monotonic() + timeout
        while needle not in out and time.monotonic() < end:
            if select.select([fd], [], [], 0.2)[0]:
                try:
                    out += os.read(fd, 65536)
                except OSError:
                    break
        return out

    try:
        read_until(b">>> ")
        os.write(fd, b"What is 2 + 3?" + raw + b"\r")
        first = read_until(b">>> ")
        os.write(fd, b"Sort: 3 1 2\r")
        second = read_until(b">>> ")
        os.write(fd, b"\x04")
        _, status = os.waitpid(pid, 0)
    finally:
        os.close(fd)
    assert WARNING in first and b"internal error" not in first + second
    assert b"1 2 3" in second  # the chat went on to the next line
    assert os.waitstatus_to_exitcode(status) == 0
    assert (tmp_path / "chat_history").read_bytes().count(b"\n") == 2
