"""The ``dllm`` command: registers subcommands and maps errors to exit codes once.

Exit codes: 0 ok, 1 error (one line on stderr naming the fix), 2 bad usage, 130 interrupted.
``DLLM_DEBUG=1`` shows tracebacks.
"""
from __future__ import annotations

import importlib
import os
import sys
from typing import Annotated, Optional

import typer
from rich.markup import escape

from dllm_cli import __version__
from dllm_cli.cli import output
from dllm_cli.errors import DllmError

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


def main() -> None:
    """Console-script entry point."""
    debug = os.environ.get("DLLM_DEBUG") == "1"
    try:
        # In non-standalone mode Typer returns the exit code of typer.Exit (and 130 for Ctrl-C) instead of
        # raising it; commands themselves return None.
        code = app(standalone_mode=False)
        if isinstance(code, int) and code:
            if code == 130:
                output.err.print("interrupted")
            sys.exit(code)
    except DllmError as e:
        if debug:
            raise
        output.error(escape(str(e)))
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        output.err.print("interrupted")
        sys.exit(130)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        output.err.print("aborted")
        sys.exit(130)
    except Exception as e:  # click usage errors arrive here in standalone_mode=False
        code = getattr(e, "exit_code", None)
        if code is not None and hasattr(e, "format_message"):
            output.error(escape(e.format_message()))
            sys.exit(code)
        if debug:
            raise
        output.error(escape(f"internal error: {type(e).__name__}: {e}") + " (rerun with DLLM_DEBUG=1 and report it)")
        sys.exit(1)
    sys.exit(0)


if __name__ == "__main__":
    main()
