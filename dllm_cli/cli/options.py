"""Shared option vocabulary: declared once, used by run, chat and bench."""
from __future__ import annotations

from enum import Enum
from typing import Annotated, Optional

import typer

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


ModelArg = Annotated[Optional[str], typer.Argument(
    help="GGUF path or registry alias (default: $DLLM_MODEL, else the embedded demo model).", show_default=False)]
ModeOpt = Annotated[Mode, typer.Option("--mode", "-m", help="Decode preset: speed (more tokens per forward, edits) "
                                       "or quality.", rich_help_panel=DECODE)]
Threads = Annotated[Optional[int], typer.Option("--threads", "-t", min=1, help="CPU threads (default: all cores).",
                                                rich_help_panel=RUNTIME)]
GpuLayers = Annotated[Optional[int], typer.Option("--n-gpu-layers", "-ngl", min=0,
                                                  help="Layers to offload to the GPU (default: all when the runtime has a GPU).",
                                                  rich_help_panel=RUNTIME)]
CtxSize = Annotated[int, typer.Option("--ctx-size", "-c", min=32, help="Context size in tokens.", rich_help_panel=RUNTIME)]
KvType = Annotated[Optional[KVType], typer.Option("--kv-type", help="KV cache type (default f32: exact against the "
                                                  "reference; f16 halves the cache; q8_0 needs flash attention).",
                                                  show_default=False, rich_help_panel=RUNTIME)]
FlashAttnOpt = Annotated[FlashAttn, typer.Option("--flash-attn", "-fa", help="Flash attention: auto (on where the "
                                                 "backend supports it), on, off.", rich_help_panel=RUNTIME)]
Exact = Annotated[bool, typer.Option("--exact", help="The exact path: f32 KV cache and flash attention off (matches "
                                     "the numpy reference to 1e-4 in logits).", rich_help_panel=RUNTIME)]
Threshold = Annotated[Optional[float], typer.Option("--threshold", help="Unmask a position when its confidence is above this [0,1].",
                                                    rich_help_panel=DECODE)]
EditThreshold = Annotated[Optional[float], typer.Option("--editing-threshold",
                                                        help="Edit a decoded token when the new argmax is above this [0,1]; 0 edits whenever the argmax differs.",
                                                        rich_help_panel=DECODE)]
MaxPostSteps = Annotated[Optional[int], typer.Option("--max-post-steps", min=0, help="Edit-only steps allowed after a block is unmasked.",
                                                     rich_help_panel=DECODE)]
BlockLength = Annotated[Optional[int], typer.Option("--block-length", min=1, help="Block size (default: the model's, 32).",
                                                    rich_help_panel=DECODE)]
Temperature = Annotated[float, typer.Option("--temperature", min=0.0, help="0 = greedy.", rich_help_panel=DECODE)]
TopK = Annotated[int, typer.Option("--top-k", min=0, help="Sample from the k best tokens (0 = off).", rich_help_panel=DECODE)]
TopP = Annotated[float, typer.Option("--top-p", help="Nucleus sampling mass (0,1].", rich_help_panel=DECODE)]
Seed = Annotated[int, typer.Option("--seed", help="Random seed for sampling.", rich_help_panel=DECODE)]
MaxTokens = Annotated[int, typer.Option("--max-tokens", "-n", min=1, help="Generate at most this many tokens.",
                                        rich_help_panel=DECODE)]
Mbe = Annotated[int, typer.Option("--mbe", min=0, help="Experimental multi-block editing over N earlier blocks (0 = off).",
                                  rich_help_panel=DECODE)]
System = Annotated[Optional[str], typer.Option("--system", "-s", help="System prompt.")]
Edit = Annotated[Optional[bool], typer.Option("--edit/--no-edit", help="Force token editing on or off.",
                                              rich_help_panel=DECODE)]
