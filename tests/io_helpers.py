"""Shared helpers for the bad-I/O tests (not a test module)."""
from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dllm_cli.cli.app import main

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


def part_files(out: Path) -> list[Path]:
    """The temporary files of writers to ``out`` (``.OUT.XXXXXXXX.part``, one per writer)."""
    return sorted(out.parent.glob(f".{out.name}.*.part"))


def part_size(out: Path) -> int:
    """Size of the (first) temporary file being written for ``out``; 0 while there is none."""
    for p in part_files(out):
        try:
            return p.stat().st_size
        except OSError:
            pass
    return 0


def part_text(out: Path) -> str:
    for p in part_files(out):
        try:
            return p.read_text(errors="replace")
        except OSError:
            pass
    return ""


def runtime_or_skip() -> None:
    from dllm_cli.errors import RuntimeMissingError
    from dllm_cli.runtime.library import check

    try:
        check()
    except RuntimeMissingError as e:
        pytest.skip(f"patched runtime not built: {e}")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from converters import convert
    from dllm_cli.demo.checkpoint import tiny_config, write_checkpoint

    d = tmp_path_factory.mktemp("badio")
    write_checkpoint(d / "ckpt", tiny_config(), seed=7, head_scale=4.0)
    return str(convert(d / "ckpt", d / "tiny-f32.gguf", outtype="f32").path)


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


def _good_doc() -> dict:
    row = {"model": "m", "path": "/x/m.gguf", "threads": 2, "test": "pp32", "tps": 10.0, "step_s": {"mean": 0.1}}
    return {"results": [row, {**row, "test": "gen"}], "config": {}}


def _doc_edit(f) -> bytes:
    d = _good_doc()
    f(d)
    return json.dumps(d).encode()
