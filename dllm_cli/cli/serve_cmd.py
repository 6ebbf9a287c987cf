"""``dllm serve``: the OpenAI-compatible server and the live page, over one model. Logs go to stderr."""
from __future__ import annotations

from functools import partial
from typing import Annotated, Any, Optional

import typer

from dllm_cli.cli import options as O
from dllm_cli.cli import output
from dllm_cli.cli.app import app
from dllm_cli.runtime import options as runtime_options


@app.command("serve")
def serve(
    model: O.ModelArg = None,
    host: Annotated[str, typer.Option("--host", help="Address to bind (loopback by default).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", "-p", min=0, max=65535, help="Port to listen on.")] = 8000,
    api_key: Annotated[Optional[str], typer.Option("--api-key", envvar="DLLM_API_KEY", show_default=False,
                                                   help="Require 'Authorization: Bearer KEY' on /v1/*.")] = None,
    parallel: Annotated[int, typer.Option("--parallel", "-np", min=1, max=64,
                                          help="Requests decoded at once, batched into one forward per step "
                                          "(each a slot of --ctx-size tokens with its own KV cache).")] = 4,
    queue_size: Annotated[int, typer.Option("--queue-size", min=1, help="Requests that may wait for a free slot; "
                                            "more get HTTP 429.")] = 16,
    max_body: Annotated[int, typer.Option("--max-body", min=1024, help="Largest request body in bytes (413 above).")] = 1 << 20,
    request_timeout: Annotated[float, typer.Option(
        "--request-timeout", min=1.0, max=86400.0,
        help="Seconds one request may run on the model; then it ends with finish_reason \"length\".")] = 600.0,
    max_connections: Annotated[int, typer.Option(
        "--max-connections", min=1, max=1 << 20,
        help="Open connections at most (also kept under the open-file limit); beyond it a new one replaces "
             "the oldest idle one.")] = 256,
    allowed_host: Annotated[Optional[list[str]], typer.Option(
        "--allowed-host", show_default=False,
        help="Also answer requests whose Host header names this (repeatable; '*' = any). A loopback server "
             "answers only to its own names by default (DNS rebinding).")] = None,
    mode: O.ModeOpt = O.Mode.quality,
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
    ctx_size: Annotated[int, typer.Option("--ctx-size", "-c", callback=O.domain("ctx_size"),
                                          help="Context tokens per slot (KV memory grows with --parallel x "
                                          "--ctx-size; printed at start-up).", rich_help_panel=O.RUNTIME)] = 4096,
    kv_type: O.KvType = None,
    flash_attn: O.FlashAttnOpt = O.FlashAttn.auto,
    exact: O.Exact = False,
    rpc: O.Rpc = None,
    tensor_split: O.TensorSplit = None,
) -> None:
    """Serve a model over an OpenAI-compatible API (/v1/chat/completions, /v1/completions, /v1/models,
    /health) and a page at / that draws each answer's diffusion live. Decode options are the defaults of
    every request; a request's own fields win, up to the ceilings: --max-tokens, --max-post-steps (32 when
    not given) and --request-timeout bound what one request may ask for.

    Examples:
      dllm serve                                   # the demo model on http://127.0.0.1:8000
      dllm serve model.gguf --port 8080 --mode speed
      dllm serve model.gguf --host 0.0.0.0 --api-key "$KEY"
    """
    from rich.markup import escape

    from dllm_cli.serve import ModelBackend, ServeSettings, ServerDefaults
    from dllm_cli.serve import serve as run_server
    from dllm_cli.serve.connections import ConnectionLimits
    from dllm_cli.serve.guard import GuardPolicy
    from dllm_cli.serve.server import is_loopback
    from dllm_cli.serve.validate import Ceilings

    if not is_loopback(host) and not api_key:
        output.warn(f"--host {host} is reachable from other machines and --api-key is not set: anyone who can "
                    "reach it can use the model")
    opts = runtime_options.from_flags(kv_type=kv_type.value if kv_type else None, flash_attn=flash_attn.value,
                                      exact=exact, threads=threads, n_gpu_layers=n_gpu_layers, ctx_size=ctx_size,
                                      rpc=rpc, tensor_split=runtime_options.parse_split(tensor_split))
    defaults = ServerDefaults(mode.value, {
        "threshold": threshold, "editing_threshold": editing_threshold, "max_post_steps": max_post_steps,
        "editing": edit, "block_length": block_length, "temperature": temperature, "top_k": top_k,
        "top_p": top_p, "seed": seed, "max_tokens": max_tokens, "mbe": mbe},
        max_post_steps_cap=max_post_steps if max_post_steps is not None else 32)

    ceilings = Ceilings(max_tokens=max_tokens, max_post_steps=defaults.max_post_steps_cap or 0,
                        request_timeout_s=request_timeout)
    settings = ServeSettings(api_key=api_key, max_body_bytes=max_body, ceilings=ceilings,
                             allowed_hosts=GuardPolicy.hosts_for(host, is_loopback(host), allowed_host or ()))

    def ready(worker: Any, bound: int) -> None:
        shown = f"[{host.strip('[]')}]" if ":" in host else host
        output.info(escape(f"dllm serve: {worker.model_id} on http://{shown}:{bound}  (OpenAI API at /v1, live "
                           "page at /; Ctrl-C stops)"))
        per = getattr(worker.backend, "kv_bytes_per_slot", None)
        if per is not None:
            output.info(f"{parallel} slot{'s' if parallel > 1 else ''} x {ctx_size} tokens: KV cache "
                        f"{per / 2**20:.1f} MiB per slot, {parallel * per / 2**20:.1f} MiB in all ({opts.kv_type})")

    run_server(partial(ModelBackend, model, opts, defaults, parallel), settings, host, port, queue_size=queue_size,
               parallel=parallel, limits=ConnectionLimits(max_connections=max_connections), on_ready=ready)
