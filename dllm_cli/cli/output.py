"""The only printer: answers go to stdout, everything else (logs, progress, live view) to stderr."""
from __future__ import annotations

import json
import sys
from typing import Any

from rich.console import Console

err = Console(stderr=True, highlight=False, soft_wrap=True)
out = Console(highlight=False)  # stdout; only for rendered answers (chat's Markdown), plain when not a TTY


def answer(text: str, end: str = "\n") -> None:
    """Write answer text to stdout (never styled)."""
    sys.stdout.write(text + end)
    sys.stdout.flush()


def rendered(renderable: Any) -> None:
    """Print a Rich renderable (a Markdown answer) on stdout."""
    out.print(renderable)


def document(obj: Any) -> None:
    """Print exactly one JSON document on stdout."""
    sys.stdout.write(json.dumps(obj, ensure_ascii=False, indent=1) + "\n")
    sys.stdout.flush()


def info(msg: str) -> None:
    err.print(msg)


def warn(msg: str) -> None:
    err.print(f"[yellow]warning:[/] {msg}")


def error(msg: str) -> None:
    err.print(f"[bold red]error:[/] {msg}", markup=True, highlight=False)
