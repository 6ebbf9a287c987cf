"""Run a C call that recurses per input character on a thread whose stack is sized for the input.

llama.cpp's pre-tokenizer splits text with ``std::regex``, which recurses once per character of a match: a
prompt holding one 50,000-character "word" overflows the main thread's 8 MB stack and the process dies with
SIGSEGV. ``deep_stack`` runs such a call on a thread with about 1 KiB of stack per byte of text (virtual
memory: only the pages the recursion touches are ever committed). Short texts run directly.
"""
from __future__ import annotations

import functools
import threading
from typing import Any, Callable, TypeVar

SHALLOW_BYTES = 4096  # the main thread's stack holds the recursion for texts this long many times over
STACK_PER_BYTE = 1024  # measured: 20,000 bytes fit in 8 MB, 50,000 do not (~170-400 bytes per byte)
MAX_STACK = 4 << 30

F = TypeVar("F", bound=Callable[..., Any])


def deep_stack(fn: F) -> F:
    """Decorate ``fn(self, text, ...)`` so a long ``text`` is processed on a big-stack thread."""
    @functools.wraps(fn)
    def wrapper(self: Any, text: str, *args: Any, **kwargs: Any) -> Any:
        if len(text) <= SHALLOW_BYTES // 4 or len(text.encode("utf-8", errors="replace")) <= SHALLOW_BYTES:
            return fn(self, text, *args, **kwargs)
        stack = min(MAX_STACK, (16 << 20) + STACK_PER_BYTE * len(text.encode("utf-8", errors="replace")))
        return run_on_stack(lambda: fn(self, text, *args, **kwargs), stack)
    return wrapper  # type: ignore[return-value]


def run_on_stack(call: Callable[[], Any], stack_bytes: int) -> Any:
    """``call()`` on a thread with ``stack_bytes`` of stack; its result or exception comes back here.

    The caller waits in short slices, so Ctrl-C and SIGTERM still reach the main thread.
    """
    box: dict[str, Any] = {}

    def work() -> None:
        try:
            box["value"] = call()
        except BaseException as e:  # handed to the caller's thread
            box["error"] = e

    old = threading.stack_size()
    try:
        threading.stack_size(stack_bytes)
        worker = threading.Thread(target=work, name="dllm-deep-stack", daemon=True)
        worker.start()
    except (ValueError, RuntimeError, MemoryError):  # no such stack here: try on this thread after all
        return call()
    finally:
        threading.stack_size(old)
    while worker.is_alive():
        worker.join(0.1)
    if "error" in box:
        raise box["error"]
    return box["value"]
