"""Every file dllm writes goes through here: checked before the work starts, written atomically, cleaned up
without ever raising, and every write error becomes one ``OutputError`` line that names the path.

``check(path)`` refuses a missing or unwritable directory, a target that is a directory, and (where the
file system can tell) a disk without room for ``need_bytes``. ``atomic(path)`` yields the temporary path to
write; ``open_text(path)`` yields a text stream. An existing special file (``/dev/null``, ``/dev/stdout``, a
FIFO) is written in place when ``special=True``: renaming over it would replace the device node.

The temporary file is ``.OUT.XXXXXXXX.part`` beside ``OUT``: a name unique to this writer, created with
``O_CREAT|O_EXCL`` (``tempfile.mkstemp``), so a file or symlink already there (planted, or another writer's)
is never opened, followed or shared. Two writers racing to one ``OUT`` each write their own file; the rename
is atomic, so ``OUT`` is always one writer's whole file: the last rename wins, or, with ``overwrite=False``
(``convert`` without ``--force``), the first one, and the later writer fails with "already exists".
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
    errno.ENAMETOOLONG: "choose a shorter file name (-o PATH)",
}


def expand(path: str | Path) -> Path:
    """``~`` expanded; ``~nosuchuser`` stays as typed (and then names a missing directory) instead of raising."""
    try:
        return Path(path).expanduser()
    except RuntimeError:
        return Path(path)


def describe(e: OSError) -> str:
    """A short reason for ``e`` (never a traceback, never the path twice)."""
    return _WHY.get(e.errno or 0) or _strerror(e)


def read_reason(e: OSError) -> str:
    """A short reason for a failed read (``no such file or directory``, ``is a directory``)."""
    return _strerror(e)


def _strerror(e: OSError) -> str:
    """The system's words for ``e``; an OSError raised without an errno (by a library) gives its own message,
    or says that the system gave no reason, never just "oserror"."""
    if e.strerror:
        return e.strerror.lower()
    if e.errno:
        return os.strerror(e.errno).lower()
    text = " ".join(str(a) for a in e.args if isinstance(a, str)).strip()
    return text[:200] if text else "the operating system gave no reason"


def _ours(filename: object, path: str | Path) -> bool:
    """True when ``filename`` is ``path`` or one of this module's temporary files for it."""
    name = os.fsdecode(filename) if isinstance(filename, (str, bytes)) else str(filename)
    p, f = Path(path), Path(name)
    return name == str(p) or (f.parent == p.parent and f.name.endswith(PART_SUFFIX)
                              and f.name.startswith(temp_prefix(p)))


def write_error(path: str | Path, e: OSError, what: str = "output") -> OutputError:
    """The one-line error for a failed write of ``what`` to ``path``."""
    name = e.filename if e.filename and not _ours(e.filename, path) else path
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


PART_SUFFIX = ".part"
_NAME_KEEP = 200  # of OUT's name in the temporary one: ".", the name, ".XXXXXXXX.part" stay within NAME_MAX


def _umask() -> int:
    """The process umask (read without changing it where /proc tells, else set and restored at once)."""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def temp_prefix(path: Path) -> str:
    """The start of every temporary name for ``path`` (``.NAME.``, the name cut to fit NAME_MAX)."""
    return f".{path.name[:_NAME_KEEP]}."


def new_part(path: Path, what: str = "output") -> Path:
    """Create this writer's own empty temporary file beside ``path`` and return its name.

    ``mkstemp`` opens it with ``O_CREAT|O_EXCL``: an existing name (a planted symlink, another writer's file)
    is never reused. It gets the mode a new file would get (mkstemp's 0600 would survive the rename).
    Errors: ``OutputError`` naming ``path``.
    """
    try:
        fd, name = tempfile.mkstemp(prefix=temp_prefix(path), suffix=PART_SUFFIX, dir=path.parent)
    except OSError as e:
        raise write_error(path, e, what) from None
    try:
        os.fchmod(fd, 0o666 & ~_umask())
    except OSError:
        pass  # a file system without modes (vfat): the file stays as created
    finally:
        os.close(fd)
    return Path(name)


def commit(part: Path, path: Path, what: str = "output", *, overwrite: bool = True) -> None:
    """Rename ``part`` to ``path`` atomically (``part`` is removed on failure).

    ``overwrite=False`` never replaces a file that appeared meanwhile (another writer finished first): the
    link fails with EEXIST and this writer gets "already exists". Errors: ``OutputError`` naming ``path``.
    """
    try:
        if overwrite:
            os.replace(part, path)
            return
        try:
            os.link(part, path)  # atomic create-if-absent; never follows a symlink at ``path``
        except FileExistsError:
            raise _taken(path) from None
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.EXDEV):
                raise
            if os.path.lexists(path):  # no hard links here (vfat, some FUSE): check, then rename
                raise _taken(path) from None
            os.replace(part, path)
            return
        remove_quietly(part)
    except OSError as e:
        remove_quietly(part)
        raise write_error(path, e, what) from None
    except BaseException:
        remove_quietly(part)
        raise


def _taken(path: Path) -> OutputError:
    """``path`` appeared while this writer worked (without ``--force`` the first finished file is kept)."""
    return OutputError(f"{_short(path)} already exists (another writer finished first)",
                       "pass --force to overwrite it")


def open_nofollow(path: str | Path, flags: int) -> int:
    """An ``opener`` for ``open()``: never follows a symlink at ``path`` (ELOOP instead)."""
    return os.open(path, flags | getattr(os, "O_NOFOLLOW", 0), 0o666)


@contextmanager
def atomic(path: str | Path, *, what: str = "output", need_bytes: int = 1, create_parent: bool = False,
           checked: bool = False, overwrite: bool = True) -> Iterator[Path]:
    """``with atomic(out) as part:`` write ``part`` (this writer's own ``.OUT.XXXXXXXX.part``); it becomes
    ``out`` only if the block succeeds (``commit``: the last rename wins, or the first with ``overwrite=False``).

    Any failure (an exception, Ctrl-C, SIGTERM) removes ``part``; an ``OSError`` becomes an OutputError
    naming ``out``. ``checked`` skips the up-front check (the caller ran ``check`` before its work).
    """
    path = expand(path)
    if not checked:
        check(path, what=what, need_bytes=need_bytes, create_parent=create_parent)
    part: Path | None = None
    try:
        part = new_part(path, what)
        with aborts.partial(part):  # a ggml abort (e.g. an RPC worker dying) removes it too
            yield part
        commit(part, path, what, overwrite=overwrite)
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
        with _closing(open(part, "w", encoding="utf-8", opener=open_nofollow)) as f:
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
