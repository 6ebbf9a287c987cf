"""The ``dllm`` console script: signal handling first, then everything else.

Importing the CLI (Typer, Rich, every command module) takes a few tenths of a second. A Ctrl-C, SIGTERM or
SIGHUP in that time must end dllm like one at any later moment (130 / 143 / 129, one line, no traceback), so
this module imports nothing heavy: it installs ``dllm_cli.signals`` (standard library only) and only then
imports ``cli.app``. Python's own start-up before this module runs (a few hundredths of a second) is not
covered: a Ctrl-C there is Python's, a TERM/HUP ends the process by the signal (the shell still reports
143 / 129).
"""
from __future__ import annotations

import os
import sys

from dllm_cli import signals


def _early_exit() -> None:
    """A signal arrived before ``cli.app.main`` took over: nothing was written yet, so say so and exit."""
    signals.closing()
    try:
        sys.stderr.write(signals.exit_message() + "\n")
        sys.stderr.flush()
    except (OSError, ValueError, AttributeError):
        pass
    os._exit(signals.exit_code())


def main() -> None:
    """Install the signal handlers, then run ``cli.app.main``."""
    signals.install(owns_process=True)
    try:
        from dllm_cli.cli import app
    except KeyboardInterrupt:
        _early_exit()
        return
    try:
        app.main()
    except KeyboardInterrupt:  # only between its start and its own handlers, or while exiting: very rare
        _early_exit()


if __name__ == "__main__":
    main()
