"""``dllm run``: one prompt in, the answer on stdout. Made for shell pipelines.

Non-UTF-8 bytes on stdin are decoded with U+FFFD replacement and a warning on stderr (never rejected).
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from dllm_cli import registry
from dllm_cli.cli import options as O
from dllm_cli.cli import output
from dllm_cli.cli.app import app
from dllm_cli.cli.replay import trace_record
from dllm_cli.decoding.events import BlockEvent, DoneEvent
from dllm_cli.errors import DllmError, UsageError
from dllm_cli.generate import decode_config, load, prompt_ids, stream_generate
from dllm_cli.runtime import options as runtime_options


def read_stdin() -> str:
    """All of stdin as text; invalid UTF-8 is replaced (with a warning), never fatal."""
    data = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read().encode()
    text = data.decode("utf-8", errors="replace")
    if "\ufffd" in text and "\ufffd".encode() not in data:
        output.warn("stdin is not valid UTF-8; undecodable bytes were replaced with U+FFFD")
    return text


def split_args(first: str | None, second: str | None) -> tuple[str | None, str | None]:
    """``dllm run [MODEL] [PROMPT]``: a lone argument is the model when it names one, else the prompt."""
    if second is not None or first is None:
        return first, second
    if first == "-":
        return None, first
    try:
        registry.resolve_model(first)
        return first, None
    except DllmError:
        looks_like_path = first.endswith(".gguf") or os.sep in first
        return (first, None) if looks_like_path else (None, first)


def gather_prompt(arg: str | None, file: Path | None) -> str:
    """The prompt from the argument, --file and piped stdin (joined in that order)."""
    parts = []
    if arg == "-":
        parts.append(read_stdin())
    else:
        if arg is not None:
            parts.append(arg)
        if not sys.stdin.isatty() and not sys.stdin.closed:
            piped = read_stdin()
            if piped:
                parts.append(piped)
    if file is not None:
        try:
            parts.insert(0, file.read_text(encoding="utf-8", errors="replace"))
        except OSError as e:
            raise UsageError(f"cannot read --file {file}: {e.strerror}") from None
    text = "\n".join(p.rstrip("\n") for p in parts)
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
    raw: Annotated[bool, typer.Option("--raw", help="Send the prompt as is, without the chat template.")] = False,
    file: Annotated[Optional[Path], typer.Option("--file", "-f", help="Read the prompt from a file.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON document with text, tokens and stats.")] = False,
    trace: Annotated[Optional[Path], typer.Option("--trace", help="Write one JSON line per step event (replayable).")] = None,
    max_tokens: O.MaxTokens = 512,
    threshold: O.Threshold = None,
    editing_threshold: O.EditThreshold = None,
    max_post_steps: O.MaxPostSteps = None,
    edit: O.Edit = None,
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
) -> None:
    """Generate an answer for one prompt and print it on stdout.

    Examples:
      dllm run "What is 7 plus 5?"
      echo "Reverse: hello" | dllm run model.gguf --mode speed
      dllm run model.gguf - --json < question.txt | jq .text
    """
    model_name, prompt_arg = split_args(model_or_prompt, prompt)
    text = gather_prompt(prompt_arg, file)
    opts = runtime_options.from_flags(kv_type=kv_type.value if kv_type else None, flash_attn=flash_attn.value,
                                      exact=exact, threads=threads, n_gpu_layers=n_gpu_layers, ctx_size=ctx_size)
    loaded = load(model_name, opts)
    try:
        config = decode_config(loaded.model, mode.value, threshold=threshold, editing_threshold=editing_threshold,
                               max_post_steps=max_post_steps, editing=edit, block_length=block_length,
                               temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                               max_tokens=max_tokens, mbe=mbe)
        for w in config.warnings:
            output.warn(w)
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
        ids = prompt_ids(loaded.model, messages, raw=raw)
        done = _drive(loaded, ids, config, stream=not as_json, trace=trace)
    finally:
        loaded.close()
    if as_json:
        output.document(result_document(done, ids, config, loaded.model.path))
    elif done.text and not done.text.endswith("\n"):
        output.answer("")


def _drive(loaded, ids, config, *, stream: bool, trace: Path | None) -> DoneEvent:
    part = trace.with_name(trace.name + ".part") if trace else None
    sink = open(part, "w", encoding="utf-8") if part else None
    seen: set[int] = set()  # token ids whose text the trace already carries (for `dllm chat --replay`)
    done = None
    try:
        for ev in stream_generate(loaded, ids, config):
            if sink:
                sink.write(json.dumps(trace_record(ev, loaded.model.piece, seen), ensure_ascii=False) + "\n")
            if stream and isinstance(ev, BlockEvent) and ev.text:
                output.answer(ev.text, end="")
            if isinstance(ev, DoneEvent):
                done = ev
        if sink and part and trace:  # all three are set together, when a trace was asked for
            sink.close()
            os.replace(part, trace)
    except BaseException:
        if sink and part:
            sink.close()
            part.unlink(missing_ok=True)
        raise
    assert done is not None
    return done


def result_document(done: DoneEvent, prompt: list[int], config, model_path: Path) -> dict:
    """The ``--json`` document."""
    n = len(done.ids)
    return {
        "text": done.text, "tokens": list(done.ids), "prompt_tokens": list(prompt),
        "finish_reason": done.finish_reason, "mode": config.mode, "model": str(model_path),
        "params": {k: v for k, v in config.to_dict().items() if k not in ("warnings",)},
        "forwards": done.forwards, "commits": done.commits, "tpf": round(done.tpf, 4), "edits": done.edits,
        "elapsed_s": round(done.elapsed_s, 4), "tps": round(n / done.elapsed_s, 3) if done.elapsed_s > 0 else None,
        "reused_prompt_tokens": done.reused,
    }
