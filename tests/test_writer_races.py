"""Writers that do not trust the file system (issue 24, class 2): every writer has its own temporary file,
created with O_EXCL, so a planted symlink is never followed and two writers racing to one output never share
a file; the output is always one writer's whole file. Chat history of two chats on one DLLM_HOME keeps both."""
from __future__ import annotations

import itertools
import os
import subprocess
import sys
import tempfile
import textwrap
import threading
from pathlib import Path

import pytest

from converters import base, convert
from dllm_cli import outfiles
from dllm_cli.errors import ConvertError, OutputError
from io_helpers import dllm, no_part_files, part_files

VICTIM = b"precious: must never be overwritten\n"


def plant(out: Path, victim: Path) -> list[Path]:
    """Symlinks at every name a writer to ``out`` could predict, all pointing at ``victim``."""
    victim.write_bytes(VICTIM)
    links = [out.with_name(out.name + ".part"), out.with_name(f".{out.name}.part"),
             out.with_name(f".{out.name}.tmp")]
    for link in links:
        link.symlink_to(victim)
    return links


def assert_untouched(victim: Path, links: list[Path]) -> None:
    assert victim.read_bytes() == VICTIM
    assert all(link.is_symlink() for link in links)  # neither followed nor removed


@pytest.fixture
def colliding_names(monkeypatch):
    """mkstemp's first candidate name is forced to ``.out.json.FIXED.part``-style names the test planted."""
    fixed = iter(["FIXEDAAA", "FIXEDAAA", "FIXEDBBB"])

    class Names:
        def __iter__(self):
            return self

        def __next__(self):
            return next(fixed, None) or next(real)

    real = tempfile._get_candidate_names()  # type: ignore[attr-defined]
    monkeypatch.setattr(tempfile, "_get_candidate_names", lambda: Names())


# ------------------------------------------------------------------ planted symlinks, every writer


@pytest.mark.parametrize("writer", ["write_text", "open_text", "atomic"])
def test_outfiles_writers_never_follow_a_planted_symlink(tmp_path, writer, colliding_names):
    out, victim = tmp_path / "out.json", tmp_path / "victim"
    links = plant(out, victim)
    (tmp_path / ".out.json.FIXEDAAA.part").symlink_to(victim)  # the exact name mkstemp tries first
    if writer == "write_text":
        outfiles.write_text(out, "mine")
    elif writer == "open_text":
        with outfiles.open_text(out) as f:
            f.write("mine")
    else:
        with outfiles.atomic(out) as part:
            assert part.name == ".out.json.FIXEDBBB.part"  # the planted name was skipped, not opened
            part.write_text("mine")
    assert out.read_text() == "mine" and not out.is_symlink()
    assert_untouched(victim, links)
    assert (tmp_path / ".out.json.FIXEDAAA.part").is_symlink()


def test_temporary_file_gets_the_mode_of_a_new_file(tmp_path):
    old = os.umask(0o027)
    try:
        outfiles.write_text(tmp_path / "a.md", "x")
    finally:
        os.umask(old)
    assert (tmp_path / "a.md").stat().st_mode & 0o777 == 0o640  # not mkstemp's 0600


def test_convert_never_follows_a_planted_symlink(make_checkpoint, tmp_path):
    out, victim = tmp_path / "m.gguf", tmp_path / "victim"
    links = plant(out, victim)
    convert(make_checkpoint(), out, outtype="f32")
    assert out.read_bytes()[:4] == b"GGUF"
    assert_untouched(victim, links)
    assert not part_files(out)


def test_synthetic_bench_model_never_follows_a_planted_symlink(tmp_path):
    from dllm_cli.bench.synthetic import write_random_gguf
    from dllm_cli.demo.checkpoint import tiny_config

    out, victim = tmp_path / "s.gguf", tmp_path / "victim"
    links = plant(out, victim)
    cfg = {**tiny_config(), "vocab_size": 400, "head_dim": 16}  # write_random_gguf builds its own vocabulary
    write_random_gguf(out, cfg)
    assert out.read_bytes()[:4] == b"GGUF"
    assert_untouched(victim, links)


def test_chat_save_never_follows_a_planted_symlink(tmp_path):
    from dllm_cli.chat import Conversation

    conv = Conversation()
    conv.add_user("hello")
    for name in ("t.md", "t.json"):
        out, victim = tmp_path / name, tmp_path / f"victim-{name}"
        links = plant(out, victim)
        conv.save(out)
        assert "hello" in out.read_text()
        assert_untouched(victim, links)


@pytest.mark.parametrize("writer", ["trace", "convert", "save"])
def test_cli_writers_never_follow_a_planted_symlink(writer, make_checkpoint, tmp_path):
    out = tmp_path / {"trace": "t.jsonl", "convert": "m.gguf", "save": "chat.md"}[writer]
    victim = tmp_path / "victim"
    links = plant(out, victim)
    if writer == "trace":
        r = dllm("run", "What is 2 + 3?", "--trace", out)
    elif writer == "convert":
        r = dllm("convert", make_checkpoint(), "-o", out, "--outtype", "f32")
    else:
        r = dllm("chat", input=f"What is 2 + 3?\n/save {out}\n".encode())
    assert r.returncode == 0, r.stderr
    assert out.stat().st_size > 0 and not out.is_symlink()
    assert_untouched(victim, links)
    assert not part_files(out)


# ------------------------------------------------------------------ two writers racing to one output


def _race(n: int, write) -> list[BaseException | None]:
    """Run ``write(i)`` in ``n`` threads at once; returns each one's exception or None."""
    barrier = threading.Barrier(n)
    results: list[BaseException | None] = [None] * n

    def body(i: int) -> None:
        barrier.wait()
        try:
            write(i)
        except BaseException as e:  # noqa: BLE001  (the test inspects it)
            results[i] = e

    threads = [threading.Thread(target=body, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_racing_text_writers_leave_one_whole_file(tmp_path):
    out = tmp_path / "r.json"
    payloads = [f"{i}:" + chr(ord("a") + i) * 200_000 + "\n" for i in range(6)]

    def write(i: int) -> None:
        with outfiles.open_text(out) as f:
            for k in range(0, len(payloads[i]), 4096):
                f.write(payloads[i][k:k + 4096])
                f.flush()

    for _ in range(5):
        assert _race(len(payloads), write) == [None] * len(payloads)  # last rename wins, nobody fails
        assert out.read_text() in payloads  # one writer's whole file, nothing interleaved
        assert no_part_files(tmp_path)


@pytest.fixture
def overlapping_converts(monkeypatch):
    """Both converts are mid-write at the same moment: every tensor waits for the other writer's."""
    barrier = threading.Barrier(2, timeout=30)
    real = base.tensor_chunks

    def chunks(ckpt, plan):
        try:
            barrier.wait()
        except threading.BrokenBarrierError:
            pass
        yield from real(ckpt, plan)

    monkeypatch.setattr(base, "tensor_chunks", chunks)
    return barrier


def test_two_converts_with_force_racing_to_one_output(make_checkpoint, tmp_path, tmp_path_factory,
                                                      overlapping_converts):
    ckpts = [make_checkpoint(seed=1), make_checkpoint(seed=2)]
    ref_dir = tmp_path_factory.mktemp("ref")
    out = tmp_path / "m.gguf"
    results = _race(2, lambda i: convert(ckpts[i], out, outtype="f32", force=True))
    assert results == [None, None]
    overlapping_converts.abort()
    monkey_free = [convert(c, ref_dir / f"r{i}.gguf", outtype="f32").path.read_bytes() for i, c in enumerate(ckpts)]
    assert monkey_free[0] != monkey_free[1]
    assert out.read_bytes() in monkey_free  # whole, and one writer's own data
    assert not part_files(out)


def test_two_converts_without_force_one_wins_the_other_is_refused(make_checkpoint, tmp_path, overlapping_converts):
    ckpts = [make_checkpoint(seed=1), make_checkpoint(seed=2)]
    out = tmp_path / "m.gguf"
    results = _race(2, lambda i: convert(ckpts[i], out, outtype="f32"))
    ok = [r for r in results if r is None]
    failed = [r for r in results if r is not None]
    assert len(ok) == 1 and len(failed) == 1, results
    assert isinstance(failed[0], (OutputError, ConvertError)) and "already exists" in str(failed[0])
    assert "--force" in str(failed[0])
    winner = results.index(None)
    overlapping_converts.abort()
    ref = convert(ckpts[winner], tmp_path / "ref.gguf", outtype="f32").path
    assert out.read_bytes() == ref.read_bytes()  # the first writer's file was not replaced
    assert not part_files(out)


def test_two_convert_processes_racing_each_file_whole(make_checkpoint, tmp_path):
    """The CLI end to end, as the issue ran it: two processes, one -o, --force."""
    ckpts = [make_checkpoint(seed=3, num_hidden_layers=4), make_checkpoint(seed=4, num_hidden_layers=4)]
    refs = [convert(c, tmp_path / f"ref{i}.gguf", outtype="f32").path.read_bytes() for i, c in enumerate(ckpts)]
    out = tmp_path / "out" / "m.gguf"
    out.parent.mkdir()
    for _ in range(3):
        procs = [subprocess.Popen([str(Path(sys.executable).with_name("dllm")), "convert", str(c), "-o", str(out),
                                   "--outtype", "f32", "--force"], stdin=subprocess.DEVNULL,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE) for c in ckpts]
        codes = [p.wait(timeout=300) for p in procs]
        assert codes == [0, 0], [p.stderr.read() for p in procs if p.stderr]
        assert out.read_bytes() in refs
        assert list(out.parent.iterdir()) == [out]


def test_a_lost_no_clobber_race_is_one_line(tmp_path, monkeypatch):
    """Another writer creates the output between our check and our rename (no --force)."""
    out = tmp_path / "m.gguf"
    with pytest.raises(OutputError) as e:
        with outfiles.atomic(out, overwrite=False) as part:
            part.write_bytes(b"mine")
            out.write_bytes(b"theirs")
    assert out.read_bytes() == b"theirs" and "already exists" in str(e.value)
    assert list(tmp_path.iterdir()) == [out]


def test_no_clobber_without_hard_links_still_refuses(tmp_path, monkeypatch):
    import errno

    def no_link(a, b):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_link)
    out = tmp_path / "m.gguf"
    with outfiles.atomic(out, overwrite=False) as part:
        part.write_bytes(b"first")
    assert out.read_bytes() == b"first"
    with pytest.raises(OutputError, match="already exists"):
        with outfiles.atomic(out, overwrite=False) as part:
            part.write_bytes(b"second")
    assert out.read_bytes() == b"first" and list(tmp_path.iterdir()) == [out]


# ------------------------------------------------------------------ chat history shared by two chats


HISTORY_WRITER = textwrap.dedent("""
    import readline, sys, time
    from pathlib import Path
    from dllm_cli.cli.history import History
    path, tag, n = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    h = History(readline, path)
    h.start()
    Path(sys.argv[4]).touch()
    while not Path(sys.argv[5]).exists():  # both have read the file before either writes
        time.sleep(0.01)
    for i in range(n):
        readline.add_history(f"{tag} line {i}")
        h.save()
    h.save()
""")


def test_two_chats_sharing_a_history_keep_each_others_lines(tmp_path):
    path = tmp_path / "chat_history"
    path.write_text("old line\n")
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", HISTORY_WRITER, str(path), tag, "150", str(tmp_path / tag),
                               str(go)], stderr=subprocess.PIPE) for tag in ("A", "B")]
    for tag in ("A", "B"):
        while not (tmp_path / tag).exists():
            assert all(p.poll() is None for p in procs), [p.stderr.read() for p in procs if p.stderr]
    go.touch()
    assert [p.wait(timeout=60) for p in procs] == [0, 0]
    lines = path.read_text().splitlines()
    assert sorted(lines) == sorted(["old line"] + [f"{t} line {i}" for t in "AB" for i in range(150)])
    for tag in "AB":  # each chat's lines in the order typed
        mine = [x for x in lines if x.startswith(tag)]
        assert mine == [f"{tag} line {i}" for i in range(150)]


def test_history_is_trimmed_and_a_symlinked_history_is_left_alone(tmp_path):
    import readline

    from dllm_cli.cli.history import LENGTH, History

    path = tmp_path / "chat_history"
    path.write_text("".join(f"x{i}\n" for i in range(LENGTH + 50)))
    readline.clear_history()
    h = History(readline, path)
    h.start()
    readline.add_history("new")
    h.save()
    lines = path.read_text().splitlines()
    assert len(lines) == LENGTH and lines[-1] == "new"

    victim = tmp_path / "victim"
    victim.write_bytes(VICTIM)
    link = tmp_path / "linked_history"
    link.symlink_to(victim)
    warned: list[str] = []
    readline.clear_history()
    h = History(readline, link, warn=warned.append)
    h.start()
    readline.add_history("secret")
    h.save()
    assert victim.read_bytes() == VICTIM and warned and "not a regular file" in warned[0]
    readline.clear_history()


def test_candidate_names_fixture_is_really_used(colliding_names):
    names = tempfile._get_candidate_names()  # type: ignore[attr-defined]
    assert list(itertools.islice(names, 3)) == ["FIXEDAAA", "FIXEDAAA", "FIXEDBBB"]


def test_runtime_source_extraction_never_follows_a_planted_symlink(tmp_path):
    """``dllm runtime build`` unpacks llama.cpp into its own temporary directory, then renames it."""
    import io
    import tarfile

    from ggml_patch import build

    sdist = tmp_path / "sdist.tar.gz"
    prefix = f"llama_cpp_python-{build.VERSION}/vendor/llama.cpp/"
    with tarfile.open(sdist, "w:gz") as tar:
        for name, data in (("CMakeLists.txt", b"project(x)\n"), ("src/a.c", b"int a;\n")):
            info = tarfile.TarInfo(prefix + name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    dest = tmp_path / "build" / "llama.cpp"
    dest.parent.mkdir()
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep").write_bytes(VICTIM)
    for name in ("llama.cpp.part", ".llama.cpp.part"):
        (dest.parent / name).symlink_to(victim)
    build._extract(sdist, dest)
    assert (dest / "src" / "a.c").read_bytes() == b"int a;\n"
    assert sorted(p.name for p in victim.iterdir()) == ["keep"] and (victim / "keep").read_bytes() == VICTIM
    assert sorted(p.name for p in dest.parent.iterdir()) == [".llama.cpp.part", "llama.cpp", "llama.cpp.part"]
