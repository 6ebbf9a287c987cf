"""The chat's input history in ``$DLLM_HOME/chat_history``, shared safely by every chat using that home.

Each chat reads the file once at start, then appends only the lines typed since its last save (readline's
``append_history_file``, which also trims the file to ``LENGTH`` entries), under an exclusive ``fcntl.flock``
on ``chat_history.lock``: two chats running side by side both keep all their lines, in the order they were
saved. The history is saved after every line, so a chat that is killed loses nothing already typed.

A history file that is not a regular file (a symlink, a directory) is left alone: the chat runs without
saving history and says so once. Failures to read or write history never stop the chat.
"""
from __future__ import annotations

import os
import stat
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Callable, Iterator

LENGTH = 1000  # entries kept in the file


class History:
    """``start()`` once, then ``save()`` after each line read and at exit."""

    def __init__(self, readline: ModuleType, path: Path, warn: Callable[[str], None] | None = None) -> None:
        self.readline = readline
        self.path = path
        self.lock_path = path.with_name(path.name + ".lock")
        self.warn = warn
        self.saved = 0  # entries of readline's in-memory history already in the file (or read from it)
        self.enabled = False

    def start(self) -> None:
        """Load the file into readline's history; disable saving when the path is unusable."""
        self.readline.set_history_length(LENGTH)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if not self._regular_or_absent():
                if self.warn:
                    self.warn(f"{self.path} is not a regular file; the chat history is not saved")
                return
            with self._locked():
                if self.path.exists():
                    self.readline.read_history_file(str(self.path))
        except OSError:
            return
        self.enabled = True
        self.saved = self.readline.get_current_history_length()

    def save(self) -> None:
        """Append the entries added since the last save (never raises)."""
        if not self.enabled:
            return
        n = self.readline.get_current_history_length() - self.saved
        if n <= 0:
            return
        try:
            with self._locked():
                if not self._regular_or_absent():
                    self.enabled = False
                    return
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | getattr(os, "O_NOFOLLOW", 0),
                             0o600)
                os.close(fd)
                append = getattr(self.readline, "append_history_file", None)
                if append is not None:
                    append(n, str(self.path))
                else:  # a readline without append (old libedit): rewrite, losing other chats' new lines
                    self.readline.write_history_file(str(self.path))
        except OSError:
            return
        self.saved += n

    def _regular_or_absent(self) -> bool:
        try:
            return stat.S_ISREG(os.lstat(self.path).st_mode)
        except FileNotFoundError:
            return True

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """An exclusive lock shared by every chat on this history file (none where fcntl is missing)."""
        try:
            import fcntl
        except ImportError:
            yield
            return
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)
