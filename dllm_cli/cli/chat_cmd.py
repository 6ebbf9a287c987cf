"""``dllm chat``: interactive multi-turn chat with a live view of unmasking and editing.

The live view (``cli/live.py``) is drawn on stderr's terminal, each step held at least ``--view-pace``
milliseconds (``cli/pace.py``: the decoder runs ahead in a thread, only the drawing is paced); finished answers go
to stdout (Markdown unless ``--plain``). Without a terminal on stderr, or with ``--no-live``, only the finalized
answer text is printed, block by block (``cli/screen.py``). ``--replay TRACE`` plays a ``dllm run --trace`` file
through the same view, without a model.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Iterable, Optional

import typer
from rich.markup import escape

from dllm_cli import constrain, domains, signals
from dllm_cli import text as text_rules
from dllm_cli.chat import SETTINGS, Chat
from dllm_cli.cli import options as O
from dllm_cli.cli import output
from dllm_cli.cli.app import app
from dllm_cli.cli.history import History
from dllm_cli.cli.live import PieceCache
from dllm_cli.cli.pace import DEFAULT_PACE_MS
from dllm_cli.cli.replay import paced, read_trace
from dllm_cli.cli.screen import Screen
from dllm_cli.decoding.events import DoneEvent, Event
from dllm_cli.errors import ContextFullError, DllmError, OutputError, StdoutClosed, UsageError, clip
from dllm_cli.printable import printable
from dllm_cli.registry import dllm_home
from dllm_cli.signals import Terminated

HELP = """[bold]commands[/]
  /mode speed|quality     switch decode preset (resets thresholds set by hand)
  /set [NAME VALUE]       show settings, or set one: {names}
  /set schema FILE|off    constrain answers to a JSON Schema (file or inline JSON); /set regex PATTERN|off
  /clear                  forget the conversation (and its KV cache)
  /save PATH              write the transcript (.md or .json)
  /retry                  ask the last question again
  /help                   this help
  /exit                   leave (also Ctrl-D; Ctrl-C at an empty prompt leaves with exit 130)
  \"\"\"                     start / end a multi-line message
Ctrl-C while an answer is being written stops it; a second Ctrl-C leaves."""
CONSTRAINT_SETTINGS = ("schema", "regex")  # /set schema FILE_OR_JSON|off, /set regex PATTERN|off
VIEW_SETTINGS = ("view_pace",)  # /set names of the screen, not of the decoder (Chat.set owns the others)

# The embedded demo model knows only a few toy task families (docs/DEMO_MODEL.md): say what to type.
DEMO_PROMPTS = (
    ("Sort: 9 3 7 1", "a short task: filled in a forward or two"),
    ("Tell me about the banana.", "an open question: one word choice unmasked per forward"),
    ("/mode speed", "then ask it again: several choices per forward, mixed words edited"),
)
DEMO_EXAMPLES = "[grey50]the demo model knows a few toy tasks; try:[/]\n" + "\n".join(
    f"  [bold]{escape(p)}[/]{' ' * (27 - len(p))}[grey50]{escape(why)}[/]" for p, why in DEMO_PROMPTS)


def is_demo(path: Path) -> bool:
    """Is ``path`` the embedded demo model (the default when no model is given)?"""
    from dllm_cli.registry import embedded_model_path

    try:
        return Path(path).resolve() == embedded_model_path().resolve()
    except OSError:
        return False


@app.command("chat")
def chat(
    model: O.ModelArg = None,
    mode: O.ModeOpt = O.Mode.quality,
    system: O.System = None,
    no_live: Annotated[bool, typer.Option("--no-live", help="No live view: print finalized text only.")] = False,
    plain: Annotated[bool, typer.Option("--plain", help="Print answers as plain text, not Markdown.")] = False,
    replay: Annotated[Optional[Path], typer.Option("--replay", help="Replay a `dllm run --trace` file (no model needed).",
                                                   show_default=False)] = None,
    speed: Annotated[float, typer.Option("--speed", callback=O.domain("speed"), help="Replay speed factor (0 = no pauses).")] = 1.0,
    view_pace: Annotated[int, typer.Option(
        "--view-pace", metavar="MS", callback=O.domain("view_pace"),
        help="Live view: hold each step on screen at least MS milliseconds (0 = draw as fast as the model decodes); "
             "decoding is not slowed, only the drawing. Also /set view_pace MS.")] = DEFAULT_PACE_MS,
    max_tokens: O.MaxTokens = 512,
    threshold: O.Threshold = None,
    editing_threshold: O.EditThreshold = None,
    max_post_steps: O.MaxPostSteps = None,
    edit: O.Edit = None,
    indel: O.Indel = None,
    block_length: O.BlockLength = None,
    temperature: O.Temperature = 0.0,
    top_k: O.TopK = 0,
    top_p: O.TopP = 1.0,
    seed: O.Seed = 0,
    mbe: O.Mbe = 0,
    threads: O.Threads = None,
    n_gpu_layers: O.GpuLayers = None,
    ctx_size: O.CtxSize = 4096,
    kv_type: O.KvType = None,
    flash_attn: O.FlashAttnOpt = O.FlashAttn.auto,
    exact: O.Exact = False,
    rpc: O.Rpc = None,
    tensor_split: O.TensorSplit = None,
    json_schema: O.JsonSchemaOpt = None,
    regex: O.RegexOpt = None,
) -> None:
    """Chat with a model and watch it unmask and edit its answer, block by block.

    Type /help inside for commands (/mode, /set, /clear, /save, /retry, /exit).

    Examples:
      dllm chat
      dllm chat model.gguf --mode speed --system "Answer briefly."
      dllm chat --view-pace 200          # slow motion: each step of the live view stays 0.2 s
      dllm run "Write a haiku" --trace t.jsonl && dllm chat --replay t.jsonl --speed 0.5
    """
    live = not no_live and output.err.is_terminal
    if replay is not None:
        trace = read_trace(replay)
        Screen(live=live, plain=plain, piece=PieceCache(table=trace.pieces)).show(
            paced(trace.events, speed, sleep=signals.nap))
        return
    from dllm_cli.generate import decode_config, load
    from dllm_cli.runtime import options as runtime_options

    opts = runtime_options.from_flags(kv_type=kv_type.value if kv_type else None, flash_attn=flash_attn.value,
                                      exact=exact, threads=threads, n_gpu_layers=n_gpu_layers, ctx_size=ctx_size,
                                      rpc=rpc, tensor_split=runtime_options.parse_split(tensor_split))
    overrides = dict(threshold=threshold, editing_threshold=editing_threshold, max_post_steps=max_post_steps,
                     editing=edit, indel=indel, block_length=block_length, temperature=temperature, top_k=top_k, top_p=top_p,
                     seed=seed, max_tokens=max_tokens, mbe=mbe)
    wanted = constrain.request(json_schema, regex)  # a bad schema is refused before the model loads
    loaded = load(model, opts)
    try:
        config = decode_config(loaded.model, mode.value, **overrides)
        for w in config.warnings:
            output.warn(w)
        session = Chat(loaded, config, system=text_rules.clean(system, "--system", output.warn) if system else system,
                       overrides=overrides)
        if wanted is not None:
            session.set_constraint("schema" if wanted.kind == "json_schema" else "regex",
                                   json_schema if json_schema is not None else str(regex))
        Repl(session, Screen(live=live, plain=plain, piece=loaded.model.piece, pace_ms=view_pace)).loop()
    finally:
        loaded.close()


class _TooLong(Exception):
    """A piped line longer than the context could hold."""


def max_message_chars(n_ctx: int) -> int:
    """The longest message a context of ``n_ctx`` tokens could hold (the bound ``dllm run`` uses for input)."""
    from dllm_cli.cli.run_cmd import input_bound

    return input_bound(n_ctx)


class Repl:
    """Read a line, run a slash command or a turn, repeat; returns on /exit or Ctrl-D (a Ctrl-C at the prompt, or a
    second one during an answer, raises KeyboardInterrupt: exit 130)."""

    def __init__(self, chat: Chat, screen: Screen) -> None:
        self.chat = chat
        self.screen = screen
        self.interactive = sys.stdin.isatty()
        self.history: History | None = None

    def loop(self) -> None:
        self._start_readline()
        if self.interactive:
            name = escape(printable(self.chat.loaded.model.path.name, lines=False))
            output.err.print(f"[grey50]dllm chat · {name} · mode {self.chat.config.mode}"
                             " · /help for commands, Ctrl-D to exit[/]")
            if is_demo(self.chat.loaded.model.path):
                output.err.print(DEMO_EXAMPLES)
        try:
            while True:
                text = self.read()
                self._save_history()  # now, not at exit: another chat on this DLLM_HOME appends its own lines
                if text is None:
                    return
                if not text.strip():
                    continue
                if text.lstrip().startswith("/"):
                    if self.command(text.strip()) is False:
                        return
                else:
                    self.turn(self.chat.ask(text))
        finally:
            self._save_history()

    # --- input ---------------------------------------------------------------------------------
    def _start_readline(self) -> None:
        if not self.interactive:
            return
        try:
            import readline
        except ImportError:  # Windows without pyreadline: input() still works, without history
            return
        self.history = History(readline, dllm_home() / "chat_history", warn=output.warn)
        self.history.start()

    def _save_history(self) -> None:
        if self.history is not None:
            self.history.save()

    def _input(self, prompt: str) -> str:
        """One line typed or piped; undecodable bytes are replaced with U+FFFD, with a warning (never fatal),
        except in ``/save PATH``, whose path is used as typed."""
        try:
            line = self._read_line(prompt)
        except UnicodeDecodeError:  # stdin could not be set to surrogateescape (an embedding's own stream)
            output.warn("the line was not valid UTF-8 and was skipped")
            return ""
        if line.lstrip().startswith("/save "):
            return line  # a path: used as the bytes typed
        return text_rules.clean(line, "the chat line", output.warn)

    def _read_line(self, prompt: str) -> str:
        if self.interactive and sys.stdout.isatty():
            return input(prompt)  # readline draws the prompt and does the line editing
        if self.interactive:
            output.err.print(prompt, end="")
            return input()
        return self._piped_line()

    def _piped_line(self) -> str:
        """One line of piped stdin, never more than the context could hold: a longer one is skipped (read in
        bounded pieces up to its newline) with a message, instead of being read whole into memory."""
        limit = max_message_chars(getattr(self.chat.loaded.session, "n_ctx", 4096))
        line = sys.stdin.readline(limit + 1)
        if not line:
            raise EOFError
        if len(line) <= limit or line.endswith("\n"):
            return line.rstrip("\n")
        while (rest := sys.stdin.readline(1 << 20)) and not rest.endswith("\n"):
            pass
        raise _TooLong(f"a message longer than {limit} characters cannot fit the context; it was skipped")

    def read(self) -> str | None:
        """One user message (``\"\"\"`` opens a multi-line one); None means leave."""
        try:
            line = self._input(">>> ")
        except EOFError:
            if self.interactive:
                signals.check_terminal()  # an EOF because the terminal hung up is a SIGHUP (exit 129)
                output.err.print()
            return None
        except _TooLong as e:
            output.err.print(f"[red]{escape(str(e))}[/]")
            return ""
        except Terminated:
            raise
        except KeyboardInterrupt:
            typed = self.history.readline.get_line_buffer() if self.history is not None else ""
            if self.interactive:
                output.err.print()
            if not typed.strip():
                raise  # Ctrl-C at an empty prompt ends the chat like any Ctrl-C (exit 130)
            return ""  # Ctrl-C drops a typed line
        if line.strip() != '"""':
            return line
        lines = []
        try:
            while (line := self._input("... ")).strip() != '"""':
                lines.append(line)
        except EOFError:  # the end of input closes the message
            pass
        except _TooLong as e:
            output.err.print(f"[red]{escape(str(e))}[/]")
            return ""
        except Terminated:
            raise
        except KeyboardInterrupt:  # cancels the message
            output.err.print()
            return ""
        return "\n".join(lines)

    # --- commands ------------------------------------------------------------------------------
    def command(self, line: str) -> bool | None:
        """Run a slash command; False means exit. Bad input gives a one-line message, the session goes on."""
        name, _, arg = line.partition(" ")
        arg = arg.strip()
        try:
            if name in ("/exit", "/quit", "/bye"):
                return False
            if name == "/help":
                output.err.print(HELP.format(names=", ".join([*SETTINGS, *VIEW_SETTINGS])))
            elif name == "/mode":
                if arg:
                    self.chat.set_mode(arg)
                output.err.print(f"mode {self.chat.config.mode}: {self._knobs()}")
            elif name == "/set":
                output.err.print(self._set(arg))
            elif name == "/clear":
                self.chat.clear()
                output.err.print("conversation cleared")
            elif name == "/save":
                if not arg:
                    raise UsageError("/save needs a file name", "for example: /save chat.md (or .json)")
                path = self.chat.conversation.save(arg)
                output.err.print(f"saved {escape(str(path))}")
            elif name == "/retry":
                self.turn(self.chat.retry())
            else:
                raise UsageError(f"unknown command {clip(name, quote=False)}", "type /help for the list")
        except StdoutClosed:
            raise
        except DllmError as e:  # a bad value, a /save that cannot be written: say why, keep chatting
            output.err.print(f"[red]{escape(output.one_line(str(e)))}[/]")
        return None

    def _set(self, arg: str) -> str:
        """``/set`` lists every setting; ``/set NAME VALUE`` sets one (validated) and says what is in force."""
        if not arg:
            return self._knobs(all_=True)
        key, _, value = arg.partition(" ")
        if not value.strip():
            raise UsageError(f"/set {key} needs a value", "for example: /set threshold 0.6")
        name = key.strip().lower().replace("-", "_")
        if name not in SETTINGS and name not in VIEW_SETTINGS and name not in CONSTRAINT_SETTINGS:
            raise UsageError(f"unknown setting {clip(key)}",
                             "settings: " + ", ".join([*SETTINGS, *VIEW_SETTINGS, *CONSTRAINT_SETTINGS]))
        if name in CONSTRAINT_SETTINGS:
            return self.chat.set_constraint(name, value)
        if name == "view_pace":
            self.screen.pace_ms = domains.parse("view_pace", value)
            return f"view_pace={self.screen.pace_ms} ms"
        self.chat.set(key, value)
        return self._knobs()

    def _knobs(self, all_: bool = False) -> str:
        s = self.chat.settings()
        keys = list(s) if all_ else ["threshold", "editing_threshold", "max_post_steps", "editing", "indel"]
        knobs = ", ".join(f"{k}={s[k]}" for k in keys if k != "mode" or all_)
        return knobs + f", view_pace={self.screen.pace_ms}" if all_ else knobs

    # --- one answer ----------------------------------------------------------------------------
    def turn(self, events: Iterable[Event]) -> None:
        """Show one answer; Ctrl-C stops it (kept, marked interrupted); errors leave the session usable.

        A second Ctrl-C before the chat is back at the prompt (while the first one is handled, however close
        together they came) ends the chat, as a Ctrl-C at the prompt would: exit 130.
        """
        pressed = signals.interrupts
        try:
            self.screen.show(events, self.chat.config.mode)
        except (Terminated, OutputError):  # SIGTERM/SIGHUP or a stdout that fails end the session, not the turn
            self._close(events)
            raise
        except KeyboardInterrupt:
            self._close(events)
            self.screen.finish(interrupted=True)
            if signals.interrupts - pressed >= 2:
                raise
        except ContextFullError as e:
            self._close(events)
            output.err.print(f"[yellow]{escape(e.message)}.[/] The conversation no longer fits the context: "
                             "type [bold]/clear[/] to start over ([bold]/save PATH[/] first to keep it), "
                             "or restart with a larger --ctx-size.")
        except UsageError as e:
            self._close(events)
            output.err.print(f"[red]{escape(str(e))}[/]")
        except DllmError as e:
            self._close(events)
            output.error(escape(str(e)))
        else:
            if signals.interrupts - pressed >= 2:  # the answer had finished; the view caught up on the first
                raise KeyboardInterrupt
            done = self.screen.view.done
            if done is not None and done.finish_reason == "length" and self._nearly_full(done):
                output.err.print("[yellow]the context is almost full:[/] type [bold]/clear[/] to start over")

    @staticmethod
    def _close(events: Iterable[Event]) -> None:
        close = getattr(events, "close", None)
        if close is not None:
            close()

    def _nearly_full(self, done: DoneEvent) -> bool:
        session = self.chat.loaded.session
        return done.prompt_tokens + len(done.ids) + session.block_length >= session.n_ctx
