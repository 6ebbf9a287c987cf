"""Every file dllm writes goes through here: checked before the work starts, written atomically
(``OUT.part`` renamed at the end), cleaned up without ever raising, and every write error becomes one
``OutputError`` line that names the path.

``check(path)`` refuses a missing or unwritable directory, a target that is a directory, and (where the
file system can tell) a disk without room for ``need_bytes``. ``atomic(path)`` yields the ``.part`` path to
write; ``open_text(path)`` yields a text stream. An existing special file (``/dev/null``, ``/dev/stdout``, a
FIFO) is written in place when ``special=True``: renaming over it would replace the device node.
"""
from __future__ import annotations

import errno
import os
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator

from dllm_cli.runtime import aborts
from dllm_cli.errors import DllmError, OutputError

_WHY = {
    errno.EACCES: "permission denied", errno.EPERM: "permission denied",
    errno.EROFS: "the file system is read-only", errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded", errno.EFBIG: "the file is too large for the file system",
    errno.EISDIR: "it is a directory", errno.ENOTDIR: "a parent of it is not a directory",
    errno.ENOENT: "its directory does not exist", errno.EPIPE: "the reader closed the pipe",
    errno.ENAMETOOLONG: "the file name is too long", errno.EIO: "an I/O error occurred",
}
_FIX = {
    errno.ENOSPC: "free disk space or choose another path", errno.EDQUOT: "free disk space or choose another path",
    errno.EACCES: "choose a writable directory", errno.EPERM: "choose a writable directory",
    errno.EROFS: "choose a writable directory", errno.EISDIR: "give a file name, not a directory",
    errno.ENOENT: "create the directory first or choose another path",
    errno.ENOTDIR: "create the directory first or choose another path",
}


def expand(path: str | Path) -> Path:
    """``~`` expanded; ``~nosuchuser`` stays as typed (and then names a missing directory) instead of raising."""
    try:
        return Path(path).expanduser()
    except RuntimeError:
        return Path(path)


def describe(e: OSError) -> str:
    """A short reason for ``e`` (never a traceback, never the path twice)."""
    return _WHY.get(e.errno or 0) or (e.strerror or type(e).__name__).lower()


def read_reason(e: OSError) -> str:
    """A short reason for a failed read (``no such file or directory``, ``is a directory``)."""
    return (e.strerror or type(e).__name__).lower()


def write_error(path: str | Path, e: OSError, what: str = "output") -> OutputError:
    """The one-line error for a failed write of ``what`` to ``path``."""
    name = e.filename if e.filename and str(e.filename) not in (str(path), str(path) + ".part") else path
    if isinstance(name, bytes):
        name = name.decode(errors="replace")
    return OutputError(f"cannot write {what} to {_short(name)}: {_reason(Path(str(name)), e)}",
                       _fix(Path(str(name)), e))


def _failed_path(path: Path, e: OSError) -> Path:
    """The path the OS call failed on (``mkdir -p`` fails on an ancestor), else ``path``."""
    name = e.filename.decode(errors="replace") if isinstance(e.filename, bytes) else e.filename
    return Path(name) if isinstance(name, str) and name else path


def _reason(path: Path, e: OSError) -> str:
    path = _failed_path(path, e)
    if e.errno == errno.ENOENT and _is_dir(path.parent):  # /proc: the directory is there but takes no files
        return f"{_short(path.parent)} does not accept new files"
    return describe(e)


def _fix(path: Path, e: OSError) -> str:
    if e.errno == errno.ENOENT and _is_dir(_failed_path(path, e).parent):
        return _FIX[errno.EACCES]
    return _FIX.get(e.errno or 0, "check the path")


def _is_dir(p: Path) -> bool:
    try:
        return p.is_dir()
    except (OSError, ValueError):
        return False


def _short(path: object) -> str:
    s = str(path)
    return s if len(s) <= 200 else s[:100] + "..." + s[-60:]


def _fail(path: Path, what: str, err: int) -> OutputError:
    return write_error(path, OSError(err, os.strerror(err)), what)


def is_special(path: Path) -> bool:
    """True for an existing target that is not a regular file or directory (device, FIFO, socket)."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return False
    return not stat.S_ISREG(mode) and not stat.S_ISDIR(mode)


def free_bytes(directory: Path) -> int | None:
    """Bytes this process may still write under ``directory``; None where the file system cannot tell."""
    try:
        st = os.statvfs(directory)
    except (OSError, AttributeError):
        return None
    if st.f_blocks == 0:  # pseudo file systems (/proc, /sys) report no blocks at all
        return None
    avail = st.f_bfree if hasattr(os, "geteuid") and os.geteuid() == 0 else st.f_bavail
    return avail * st.f_frsize


def check(path: str | Path, *, what: str = "output", need_bytes: int = 1, special: bool = False,
          create_parent: bool = False) -> Path:
    """Refuse ``path`` before any work when it cannot be written; returns it (``~`` expanded).

    ``create_parent`` makes a missing directory (dllm's own store under ``$DLLM_HOME``); for a path the
    user typed a missing directory is an error.
    """
    path = expand(path)
    if "\0" in str(path):
        raise OutputError(f"cannot write {what} to {_short(repr(str(path)))}: the path holds a NUL byte",
                          "give a file path")
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        mode = None
    except OSError as e:
        raise write_error(path, e, what) from None
    if mode is not None and stat.S_ISDIR(mode):
        raise _fail(path, what, errno.EISDIR)
    if mode is not None and not stat.S_ISREG(mode):
        if special:
            return path  # /dev/null, /dev/stdout, a FIFO: written in place
        raise OutputError(f"cannot write {what} to {_short(path)}: it is not a regular file", "give a file path")
    parent = path.parent
    if create_parent:
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutputError(f"cannot create the directory {_short(parent)} for {what}: {_reason(parent, e)}",
                              _fix(parent, e)) from None
    try:
        pmode = parent.stat().st_mode
    except FileNotFoundError:
        raise _fail(path, what, errno.ENOENT) from None
    except NotADirectoryError:
        raise _fail(path, what, errno.ENOTDIR) from None
    except OSError as e:
        raise write_error(path, e, what) from None
    if not stat.S_ISDIR(pmode):
        raise _fail(path, what, errno.ENOTDIR)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise _fail(path, what, errno.EROFS if _read_only(parent) else errno.EACCES)
    _probe(parent, path, what)
    free = free_bytes(parent)
    if free is not None and free < need_bytes:
        why = (f"the disk has {free / 1e6:.1f} MB free, it needs {need_bytes / 1e6:.1f} MB" if need_bytes > 1
               else "no space left on the device")
        raise OutputError(f"cannot write {what} to {_short(path)}: {why}", _FIX[errno.ENOSPC])
    return path


def _probe(parent: Path, path: Path, what: str) -> None:
    """Create and remove a file next to ``path``: the only test that sees what permission bits cannot (a
    read-only mount as root, /proc, ACLs)."""
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{path.name[:40]}.", suffix=".probe", dir=parent)
    except OSError as e:
        raise OutputError(f"cannot write {what} to {_short(path)}: {_reason(path, e)}", _fix(path, e)) from None
    os.close(fd)
    remove_quietly(probe)


def _read_only(directory: Path) -> bool:
    try:
        return bool(os.statvfs(directory).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):
        return False


def remove_quietly(path: str | Path | None) -> None:
    """Delete ``path`` if it is there; never raises (it runs inside error handlers and signal cleanup)."""
    if path is None:
        return
    try:
        os.unlink(path)
    except OSError:
        pass


def part_of(path: Path) -> Path:
    """``OUT.part`` next to ``OUT`` (``/`` or ``.`` give a name ``check`` then refuses as a directory)."""
    return path.parent / (path.name + ".part")


@contextmanager
def atomic(path: str | Path, *, what: str = "output", need_bytes: int = 1, create_parent: bool = False,
           checked: bool = False) -> Iterator[Path]:
    """``with atomic(out) as part:`` write ``part``; it becomes ``out`` only if the block succeeds.

    Any failure (an exception, Ctrl-C, SIGTERM) removes ``part``; an ``OSError`` becomes an OutputError
    naming ``out``. ``checked`` skips the up-front check (the caller ran ``check`` before its work).
    """
    path = expand(path)
    if not checked:
        check(path, what=what, need_bytes=need_bytes, create_parent=create_parent)
    part = part_of(path)
    try:
        with aborts.partial(part):  # a ggml abort (e.g. an RPC worker dying) removes it too
            yield part
        os.replace(part, path)
    except DllmError:
        remove_quietly(part)
        raise
    except OSError as e:
        remove_quietly(part)
        raise write_error(path, e, what) from None
    except BaseException:
        remove_quietly(part)
        raise


@contextmanager
def open_text(path: str | Path, *, what: str = "output", checked: bool = False) -> Iterator[IO[str]]:
    """A text stream for ``path``: atomic for a regular file, in place for ``/dev/stdout`` or a FIFO."""
    path = expand(path)
    if not checked:
        check(path, what=what, special=True)
    if is_special(path):
        try:
            with _closing(open(path, "w", encoding="utf-8")) as f:
                yield f
        except OSError as e:
            raise write_error(path, e, what) from None
        return
    with atomic(path, what=what, checked=True) as part:
        with _closing(open(part, "w", encoding="utf-8")) as f:
            yield f


@contextmanager
def _closing(f: IO[str]) -> Iterator[IO[str]]:
    """Close ``f`` after the block; when the block failed, a failing close must not hide why."""
    try:
        yield f
    except BaseException:
        try:
            f.close()
        except OSError:
            pass
        raise
    f.close()  # a full disk often shows only here, when the buffer is flushed


def write_text(path: str | Path, text: str, *, what: str = "output") -> Path:
    """Write ``text`` to ``path`` atomically (checked first); returns the path."""
    path = expand(path)
    with open_text(path, what=what) as f:
        f.write(text)
    return path
