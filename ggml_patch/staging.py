"""Build a directory beside its final place, then swap it in: the llama.cpp source tree, an installed runtime, the
assembled CUDA toolkit root and the private lavapipe all appear whole or not at all.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def staged_dir(dest: Path, *, suffix: str = "", mode: int | None = 0o755) -> Iterator[Path]:
    """``with staged_dir(dest) as tmp:`` fill ``tmp``; when the block succeeds ``tmp`` replaces ``dest``.

    ``tmp`` is this writer's own directory next to ``dest`` (``mkdtemp``: created with O_EXCL, never a planted
    symlink or another writer's files), given ``mode`` (``mkdtemp`` makes it private; ``None`` keeps it so). An
    existing ``dest`` is renamed aside first and removed after the swap, so ``dest`` is missing only between two
    renames. Any exception (Ctrl-C included) removes ``tmp`` and leaves ``dest`` as it was.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=suffix, dir=dest.parent))
    try:
        if mode is not None:
            tmp.chmod(mode)
        yield tmp
        old = None
        if dest.exists() or dest.is_symlink():
            old = dest.with_name(f".{dest.name}.old.{os.getpid()}")
            _remove(old)
            os.replace(dest, old)
        os.replace(tmp, dest)
        if old is not None:
            _remove(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _remove(path: Path) -> None:
    """Remove a directory tree, or a symlink itself (never what it points to); quietly."""
    if path.is_symlink():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)
