"""The ``dllm`` command: registers subcommands and maps errors to exit codes once.

Exit codes: 0 ok, 1 error (one line on stderr naming the fix), 2 bad usage, 130 interrupted (Ctrl-C),
143 terminated (SIGTERM), 129 hangup (SIGHUP), 141 stdout closed by its reader (like a Unix filter).
``DLLM_DEBUG=1`` shows tracebacks.
"""
from __future__ import annotations

import importlib
import os
import sys
from typing import Annotated, NoReturn, Optional

import typer
from rich.markup import escape

from dllm_cli import __version__, signals
from dllm_cli.cli import output
from dllm_cli.errors import DllmError, StdoutClosed
from dllm_cli.runtime import aborts

app = typer.Typer(
    name="dllm", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    help="Run LLaDA2.x diffusion language models locally: convert, chat, run, bench, serve.",
    rich_markup_mode="rich",
)

# Each module registers its commands on ``app`` (or a sub-Typer) when imported.
COMMAND_MODULES = (
    "dllm_cli.cli.models_cmd",
    "dllm_cli.cli.convert_cmd",
    "dllm_cli.cli.runtime_cmd",
    "dllm_cli.cli.chat_cmd",
    "dllm_cli.cli.run_cmd",
    "dllm_cli.cli.bench_cmd",
    "dllm_cli.cli.rpc_cmd",
    "dllm_cli.cli.serve_cmd",
)


def _version(value: bool) -> None:
    if value:
        output.answer(f"dllm {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[Optional[bool], typer.Option("--version", callback=_version, is_eager=True,
                                                    help="Print the version and exit.")] = None,
) -> None:
    """dllm: LLaDA2.x diffusion LLMs on your machine."""


for _name in COMMAND_MODULES:
    importlib.import_module(_name)


def _interrupted() -> NoReturn:
    """Ctrl-C, SIGTERM or SIGHUP: the cleanup already ran while the exception unwound; say so and exit."""
    signals.closing()
    try:
        output.err.print(signals.exit_message())
    except OSError:  # a hangup can take the terminal (stderr) with it
        pass
    _exit(signals.exit_code())


def _exit(code: int) -> NoReturn:
    """Flush stdout before exiting; a reader that went away is not an error message (exit like a filter).

    A signal handled meanwhile decides the code. While a thread may still be inside llama.cpp or ggml
    (``signals.track_native``: rpc-server's worker, a decoder that would not stop) the process ends with
    ``os._exit``: C++ static destructors at a normal exit would free what that thread still uses (a segfault).
    """
    signals.closing()
    if code == 0 and signals.received is not None:
        code = signals.exit_code()
    aborts.remove_partials()  # a .part whose writer's cleanup a second signal cut short
    try:
        if sys.stdout is not None:
            sys.stdout.flush()
    except (OSError, DllmError):
        output.silence_stdout()
        code = code or 141
    if signals.native_alive():
        try:
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        os._exit(code)
    sys.exit(code)


def _report(msg: str, code: int) -> NoReturn:
    signals.closing()
    output.error(escape(output.one_line(msg)))
    _exit(code)


def _signalled(e: BaseException) -> bool:
    """Is ``e`` a consequence of a signal being handled, or of the terminal hanging up (then handled as the
    SIGHUP it stands for)? Once dllm is stopping, an error in the cleanup is not news: the signal is reported."""
    if signals.received is not None:
        return True
    if signals.is_hangup(e) or (e.__cause__ is not None and signals.is_hangup(e.__cause__)):
        signals.hangup()
        return True
    return False


def main() -> None:
    """Console-script entry point (``cli/entry.py`` installs the signal handlers before importing this)."""
    debug = os.environ.get("DLLM_DEBUG") == "1"
    signals.install()
    output.text_streams()
    aborts.install_fault_handler()  # SIGBUS (a mapped file truncated): one line, .part files removed, exit 1
    output.quiet_stderr()
    output.guard_stdout()
    if sys.stdin is None:  # started with stdin closed (<&-): read it as empty, like /dev/null
        sys.stdin = open(os.devnull)
    try:
        # In non-standalone mode Typer returns the exit code of typer.Exit (and 130 for Ctrl-C) instead of
        # raising it; commands themselves return None.
        code = app(standalone_mode=False)
        if isinstance(code, int) and code:
            if code == 130:
                _interrupted()
            _exit(code)
    except StdoutClosed as e:
        if signals.received is not None:
            _interrupted()
        output.silence_stdout()
        signals.closing()
        _exit(e.exit_code)
    except DllmError as e:
        if _signalled(e):
            _interrupted()  # an error caused by the signal (or the hangup) being handled: report the signal
        if debug:
            raise
        _report(str(e), e.exit_code)
    except KeyboardInterrupt:
        _interrupted()
    except typer.Exit as e:
        _exit(e.exit_code)
    except typer.Abort:
        if signals.received is not None:
            _interrupted()
        output.err.print("aborted")
        _exit(130)
    except Exception as e:  # click usage errors arrive here in standalone_mode=False
        if _signalled(e):
            _interrupted()
        code = getattr(e, "exit_code", None)
        if code is not None and hasattr(e, "format_message"):
            _report(e.format_message(), code)
        broken = output.stdout_broken(e) if isinstance(e, OSError) else None
        if broken is not None:  # a write to stdout outside output.py (click's --help) failed
            if isinstance(broken, StdoutClosed):
                _exit(broken.exit_code)
            _report(str(broken), broken.exit_code)
        if debug:
            raise
        _report(f"internal error: {type(e).__name__}: {e} (rerun with DLLM_DEBUG=1 and report it)", 1)
    _exit(0)


if __name__ == "__main__":
    main()
