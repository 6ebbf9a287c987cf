"""Text that enters dllm from outside: one rule for bytes that are not UTF-8.

Python hands such bytes over as lone surrogates (``surrogateescape``: argv, environment variables, stdin read
with that error handler), which no UTF-8 encoder accepts. The rule, for every *text* input (prompt arguments,
``--system``, ``--file``, stdin, chat lines typed or piped): each undecodable byte becomes U+FFFD and the CLI
warns once per input, as it always did for stdin. *Paths* (model, ``-o``, ``--trace``, ``DLLM_HOME``,
``DLLM_MODEL``) are not text: they are used as the bytes given (``os.fsencode``) and only shown with U+FFFD.
"""
from __future__ import annotations

import os
import re
from typing import Any, Callable

_SURROGATE = re.compile("[\ud800-\udfff]")
REPLACEMENT = "\ufffd"


def undecodable(text: str) -> bool:
    """True when ``text`` holds a lone surrogate (an undecodable byte under ``surrogateescape``)."""
    return _SURROGATE.search(text) is not None


def replace_undecodable(text: str) -> str:
    """``text`` with every lone surrogate replaced by U+FFFD (valid text is returned unchanged)."""
    return _SURROGATE.sub(REPLACEMENT, text)


def clean(text: str, what: str, warn: Callable[[str], Any] | None = None) -> str:
    """``text`` with undecodable bytes replaced; ``warn`` gets one line naming ``what`` when any were."""
    if not undecodable(text):
        return text
    if warn is not None:
        warn(f"{what} is not valid UTF-8; undecodable bytes were replaced with U+FFFD")
    return replace_undecodable(text)


def shown(path: str | os.PathLike[str]) -> str:
    """A path for a message: printable whatever bytes it holds."""
    return replace_undecodable(os.fspath(path))


def clean_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Chat messages whose string values hold no lone surrogate (a library-level guard: the CLI already warned)."""
    return [{k: replace_undecodable(v) if isinstance(v, str) else v for k, v in m.items()} for m in messages]


def vocab_text_problem(token: str | bytes) -> str | None:
    """Why ``token`` (a vocabulary entry or merge, as text or its GGUF bytes) cannot be used, or None.

    llama.cpp keeps token texts as C strings in places and decodes them as UTF-8: a NUL byte or bytes that
    are not UTF-8 reach an assert there instead of an error."""
    if isinstance(token, bytes):
        if b"\0" in token:
            return "holds a NUL byte"
        try:
            token.decode("utf-8")
        except UnicodeDecodeError:
            return "is not valid UTF-8"
        return None
    if "\0" in token:
        return "holds a NUL byte"
    if undecodable(token):
        return "is not valid Unicode (it holds a lone surrogate)"
    return None
