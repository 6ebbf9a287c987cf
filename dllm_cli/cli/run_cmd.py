"""``dllm run``: one prompt in, the answer on stdout. Made for shell pipelines.

Non-UTF-8 bytes on stdin are decoded with U+FFFD replacement and a warning on stderr (never rejected).
"""
from __future__ import annotations

import contextlib
import io
import json
import sys
from pathlib import Path
from typing import IO, Annotated, BinaryIO, Optional

import typer
from rich.markup import escape

from dllm_cli import constrain, outfiles, registry
from dllm_cli import text as text_rules
from dllm_cli.cli import options as O
from dllm_cli.cli import output
from dllm_cli.cli.app import app
from dllm_cli.cli.replay import trace_record
from dllm_cli.decoding.events import BlockEvent, DoneEvent
from dllm_cli.errors import ContextFullError, UsageError, clip
from dllm_cli.generate import decode_config, load, prompt_ids, stream_generate
from dllm_cli.outfiles import read_reason
from dllm_cli.runtime import options as runtime_options


MAX_BYTES_PER_TOKEN = 64  # generous: BPE tokens average ~4 bytes; even runs of spaces stay well below this


def input_bound(ctx_size: int) -> int:
    """The most bytes of prompt text a context of ``ctx_size`` tokens could possibly hold."""
    return ctx_size * MAX_BYTES_PER_TOKEN


def _too_big(what: str, bound: int, ctx_size: int) -> ContextFullError:
    return ContextFullError(f"{what} is larger than a {ctx_size}-token context can hold (over {bound} bytes)",
                            "shorten the input or raise --ctx-size")


def _read_bounded(stream: BinaryIO, what: str, bound: int, ctx_size: int) -> bytes:
    """At most ``bound`` bytes of ``stream``; more is refused before the rest is read."""
    data = stream.read(bound + 1)
    if len(data) > bound:
        raise _too_big(what, bound, ctx_size)
    return data


def _decode(data: bytes, what: str) -> str:
    """UTF-8 text; invalid bytes are replaced (with a warning), never fatal."""
    text = data.decode("utf-8", errors="replace")
    if "\ufffd" in text and "\ufffd".encode() not in data:
        output.warn(f"{what} is not valid UTF-8; undecodable bytes were replaced with U+FFFD")
    return text


def read_stdin(bound: int = 1 << 40, ctx_size: int = 0) -> str:
    """Stdin as text, at most ``bound`` bytes (more is a ContextFullError); invalid UTF-8 is replaced."""
    try:
        stream = sys.stdin.buffer if hasattr(sys.stdin, "buffer") else io.BytesIO(sys.stdin.read().encode())
        return _decode(_read_bounded(stream, "stdin", bound, ctx_size), "stdin")
    except OSError as e:  # a terminal that went away, a closed descriptor
        raise UsageError(f"cannot read stdin: {read_reason(e)}", "pass the prompt as an argument or --file") from None


def _read_file(file: Path, bound: int, ctx_size: int) -> str:
    try:
        with open(file, "rb") as f:
            return _decode(_read_bounded(f, f"--file {clip(str(file))}", bound, ctx_size), "--file")
    except OSError as e:
        raise UsageError(f"cannot read --file {clip(str(file))}: {read_reason(e)}") from None


def split_args(first: str | None, second: str | None) -> tuple[str | None, str | None]:
    """``dllm run [MODEL] [PROMPT]``: a lone argument is the model only when it is an existing file or a
    registry alias; anything else (``What is 1/2?``, text with ``</b>``) is the prompt."""
    if second is not None or first is None:
        return first, second
    if first == "-":
        return None, first
    if registry.names_model(first):
        return first, None
    if first.endswith(".gguf") and len(first) < 4096 and not any(c.isspace() for c in first):
        output.warn(f"no model file {escape(clip(first))}; reading it as the prompt")
    return None, first


def gather_prompt(arg: str | None, file: Path | None, ctx_size: int = 1 << 34) -> str:
    """The prompt from --file, the argument and piped stdin (joined in that order), refused when it is
    larger than ``ctx_size`` tokens could hold (stdin and the file are not read past that bound)."""
    bound = input_bound(ctx_size)
    parts = []
    if file is not None:
        parts.append(_read_file(file, bound, ctx_size))
    if arg == "-":
        parts.append(read_stdin(bound, ctx_size))
    else:
        if arg is not None:
            if len(arg) > bound or len(arg.encode("utf-8", errors="replace")) > bound:
                raise _too_big("the prompt argument", bound, ctx_size)
            parts.append(text_rules.clean(arg, "the prompt argument", output.warn))
        if not sys.stdin.isatty() and not sys.stdin.closed:
            piped = read_stdin(bound, ctx_size)
            if piped:
                parts.append(piped)
    text = "\n".join(p.rstrip("\n") for p in parts)
    if len(text.encode("utf-8", errors="replace")) > bound:
        raise _too_big("the prompt", bound, ctx_size)
    if not text.strip():
        raise UsageError("the prompt is empty", "pass a prompt argument, --file PATH, or pipe text on stdin")
    return text


@app.command("run")
def run(
    model_or_prompt: O.ModelArg = None,
    prompt: Annotated[Optional[str], typer.Argument(help="Prompt text; '-' reads stdin. Piped stdin is appended.",
                                                    show_default=False)] = None,
    mode: O.ModeOpt = O.Mode.quality,
    system: O.System = None,
    raw: Annotated[bool, typer.Option("--raw", help=(
        "Send the prompt as is, without the chat template; special-token text in it (<|mask|>, role "
        "markers) is parsed into control tokens. Without --raw it is always ordinary text."))] = False,
    file: Annotated[Optional[Path], typer.Option("--file", "-f", help="Read the prompt from a file.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON document with text, tokens and stats.")] = False,
    trace: Annotated[Optional[Path], typer.Option("--trace", help="Write one JSON line per step event (replayable).")] = None,
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
    """Generate an answer for one prompt and print it on stdout.

    Examples:
      dllm run "What is 7 plus 5?"
      echo "Reverse: hello" | dllm run model.gguf --mode speed
      dllm run model.gguf - --json < question.txt | jq .text
      dllm run "Describe France." --json-schema '{"type": "object", "properties": {"capital": {"type": "string"}}}'
      dllm run "When?" --regex '[0-9]{4}-[0-9]{2}-[0-9]{2}'
    """
    model_name, prompt_arg = split_args(model_or_prompt, prompt)
    wanted = constrain.request(json_schema, regex)  # schema keywords and regex syntax: before the model loads
    if trace is not None:
        trace = outfiles.check(trace, what="the trace", special=True)  # before any work, not after the answer
    opts = runtime_options.from_flags(kv_type=kv_type.value if kv_type else None, flash_attn=flash_attn.value,
                                      exact=exact, threads=threads, n_gpu_layers=n_gpu_layers, ctx_size=ctx_size,
                                      rpc=rpc, tensor_split=runtime_options.parse_split(tensor_split))
    text = gather_prompt(prompt_arg, file, ctx_size)
    loaded = load(model_name, opts)
    try:
        config = decode_config(loaded.model, mode.value, threshold=threshold, editing_threshold=editing_threshold,
                               max_post_steps=max_post_steps, editing=edit, indel=indel,
                               block_length=block_length, temperature=temperature, top_k=top_k, top_p=top_p,
                               seed=seed, max_tokens=max_tokens, mbe=mbe)
        for w in config.warnings:
            output.warn(w)
        system = text_rules.clean(system, "--system", output.warn) if system else system
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
        ids = prompt_ids(loaded.model, messages, raw=raw)
        constraint = constrain.build(loaded.model, wanted)
        done = _drive(loaded, ids, config, stream=not as_json, trace=trace, constraint=constraint)
    finally:
        loaded.close()
    if as_json:
        output.document(result_document(done, ids, config, loaded.model.path, wanted.kind if wanted else None))
    elif done.text and not done.text.endswith("\n"):
        output.answer("")


def _drive(loaded, ids, config, *, stream: bool, trace: Path | None, constraint=None) -> DoneEvent:
    with contextlib.ExitStack() as stack:
        sink = stack.enter_context(outfiles.open_text(trace, what="the trace", checked=True)) if trace else None
        seen: set[int] = set()  # token ids whose text the trace already carries (for `dllm chat --replay`)
        done = None
        for ev in stream_generate(loaded, ids, config, constraint):
            if sink:
                _trace_line(sink, trace_record(ev, loaded.model.piece, seen))
            if stream and isinstance(ev, BlockEvent) and ev.text:
                output.answer(ev.text, end="")
            if isinstance(ev, DoneEvent):
                done = ev
    assert done is not None
    return done


def _trace_line(sink: IO[str], record: dict) -> None:
    sink.write(json.dumps(record, ensure_ascii=False) + "\n")


def result_document(done: DoneEvent, prompt: list[int], config, model_path: Path,
                    constrained: str | None = None) -> dict:
    """The ``--json`` document (``constrained``: "json_schema", "regex" or null)."""
    n = len(done.ids)
    return {
        "text": done.text, "tokens": list(done.ids), "prompt_tokens": list(prompt),
        "finish_reason": done.finish_reason, "mode": config.mode, "model": str(model_path),
        "params": {k: v for k, v in config.to_dict().items() if k not in ("warnings",)},
        "forwards": done.forwards, "commits": done.commits, "tpf": round(done.tpf, 4), "edits": done.edits,
        "inserts": done.inserts, "deletes": done.deletes,
        "elapsed_s": round(done.elapsed_s, 4), "tps": round(n / done.elapsed_s, 3) if done.elapsed_s > 0 else None,
        "reused_prompt_tokens": done.reused, "constrained": constrained,
    }
