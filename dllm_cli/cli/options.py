"""Shared option vocabulary: declared once, used by run, chat and bench.

Every numeric option is checked by ``domain(name)`` against ``dllm_cli.domains`` (the table chat's ``/set`` and
``DecodeConfig`` use too), so ``--seed -1`` or ``--top-p nan`` is the same one-line usage error everywhere.
"""
from __future__ import annotations

from enum import Enum
from typing import Annotated, Any, Callable, Optional

import typer

from dllm_cli import domains

RUNTIME = "Runtime"
DECODE = "Decoding"


class Mode(str, Enum):
    speed = "speed"
    quality = "quality"


class KVType(str, Enum):
    f16 = "f16"
    f32 = "f32"
    q8_0 = "q8_0"


class FlashAttn(str, Enum):
    auto = "auto"
    on = "on"
    off = "off"


def domain(name: str) -> Callable[[Any], Any]:
    """A Typer callback checking an option's value (None: not given) against ``domains.DOMAINS[name]``."""
    def check(value: Any) -> Any:
        return value if value is None else domains.check(name, value)
    return check


ModelArg = Annotated[Optional[str], typer.Argument(
    help="GGUF path or registry alias (default: $DLLM_MODEL, else the embedded demo model).", show_default=False)]
ModeOpt = Annotated[Mode, typer.Option("--mode", "-m", help="Decode preset: speed (more tokens per forward, edits) "
                                       "or quality.", rich_help_panel=DECODE)]
Threads = Annotated[Optional[int], typer.Option("--threads", "-t", callback=domain("threads"),
                                                help="CPU threads (default: one per physical core).",
                                                rich_help_panel=RUNTIME)]
GpuLayers = Annotated[Optional[int], typer.Option(
    "--n-gpu-layers", "-ngl", callback=domain("n_gpu_layers"),
    help="Layers to offload to the GPU (default: all when the runtime has a GPU).", rich_help_panel=RUNTIME)]
CtxSize = Annotated[int, typer.Option("--ctx-size", "-c", callback=domain("ctx_size"), help="Context size in tokens.",
                                      rich_help_panel=RUNTIME)]
KvType = Annotated[Optional[KVType], typer.Option("--kv-type", help="KV cache type (default f32: exact against the "
                                                  "reference; f16 halves the cache; q8_0 needs flash attention).",
                                                  show_default=False, rich_help_panel=RUNTIME)]
FlashAttnOpt = Annotated[FlashAttn, typer.Option("--flash-attn", "-fa", help="Flash attention: auto (off on CPU, where "
                                                 "it is slower for 32-token steps; llama.cpp's choice on GPUs; on for "
                                                 "a q8_0 KV cache), on, off.", rich_help_panel=RUNTIME)]
Rpc = Annotated[Optional[str], typer.Option("--rpc", help="Offload layers to ggml RPC workers HOST:PORT[,HOST:PORT...] "
                                           "(`dllm rpc-server` on each; the protocol has no authentication).",
                                           show_default=False, rich_help_panel=RUNTIME)]
TensorSplit = Annotated[Optional[str], typer.Option("--tensor-split", "-ts", help="Share of the offloaded layers per "
                                                    "device, e.g. 3,1 (default: by free memory).", show_default=False,
                                                    rich_help_panel=RUNTIME)]
Exact = Annotated[bool, typer.Option("--exact", help="The exact path: f32 KV cache and flash attention off (matches "
                                     "the numpy reference to 1e-4 in logits).", rich_help_panel=RUNTIME)]
Threshold = Annotated[Optional[float], typer.Option(
    "--threshold", callback=domain("threshold"),
    help="Unmask a position when its confidence is above this [0,1].", rich_help_panel=DECODE)]
EditThreshold = Annotated[Optional[float], typer.Option(
    "--editing-threshold", callback=domain("editing_threshold"),
    help="Edit a decoded token when the new argmax is above this [0,1]; 0 edits whenever the argmax differs.",
    rich_help_panel=DECODE)]
MaxPostSteps = Annotated[Optional[int], typer.Option(
    "--max-post-steps", callback=domain("max_post_steps"), help="Edit-only steps allowed after a block is unmasked.",
    rich_help_panel=DECODE)]
BlockLength = Annotated[Optional[int], typer.Option("--block-length", callback=domain("block_length"),
                                                    help="Block size (default: the model's, 32).",
                                                    rich_help_panel=DECODE)]
Temperature = Annotated[float, typer.Option("--temperature", callback=domain("temperature"), help="0 = greedy.",
                                            rich_help_panel=DECODE)]
TopK = Annotated[int, typer.Option("--top-k", callback=domain("top_k"), help="Sample from the k best tokens (0 = off).",
                                   rich_help_panel=DECODE)]
TopP = Annotated[float, typer.Option("--top-p", callback=domain("top_p"), help="Nucleus sampling mass (0,1].",
                                     rich_help_panel=DECODE)]
Seed = Annotated[int, typer.Option("--seed", callback=domain("seed"), help="Random seed for sampling (0 to 2^64-1).",
                                   rich_help_panel=DECODE)]
MaxTokens = Annotated[int, typer.Option("--max-tokens", "-n", callback=domain("max_tokens"),
                                        help="Generate at most this many tokens.", rich_help_panel=DECODE)]
Mbe = Annotated[int, typer.Option("--mbe", callback=domain("mbe"),
                                  help="Experimental multi-block editing over N earlier blocks (0 = off).",
                                  rich_help_panel=DECODE)]
System = Annotated[Optional[str], typer.Option("--system", "-s", help="System prompt.")]
Edit = Annotated[Optional[bool], typer.Option("--edit/--no-edit", help="Force token editing on or off (on LLaDA2.2: "
                                              "--no-edit turns off substitution, delete and insert).",
                                              rich_help_panel=DECODE)]
Indel = Annotated[Optional[bool], typer.Option("--indel/--no-indel", help="LLaDA2.2: allow DELETE/INSERT edits "
                                               "(--no-indel keeps substitution only).", rich_help_panel=DECODE)]
STRUCTURED = "Structured output"
JsonSchemaOpt = Annotated[Optional[str], typer.Option(
    "--json-schema", rich_help_panel=STRUCTURED, show_default=False,
    help="Constrain the answer to JSON valid under this JSON Schema (a file, or inline JSON starting with '{').")]
RegexOpt = Annotated[Optional[str], typer.Option(
    "--regex", rich_help_panel=STRUCTURED, show_default=False,
    help="Constrain the whole answer to match this regular expression (Rust regex syntax, no lookarounds).")]
