"""K-quants and the MoE-aware preset through the patched library's ``llama_model_quantize``.

The router (``ffn_gate_inp``), ``exp_probs_b`` and all norms are never quantized by llama.cpp (1-D or
excluded by name), so they stay F32 as the converter wrote them.
"""
from __future__ import annotations

import ctypes
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from dllm_cli.errors import ConvertError, UsageError
from dllm_cli.runtime.library import load as load_runtime
from dllm_cli.runtime.model import inspect_gguf

# llama_ftype and ggml_type values (include/llama.h, ggml.h of the pinned tree)
_FTYPE = {"q4_0": 2, "q8_0": 7, "q4_k_m": 15, "q5_k_m": 17, "q6_k": 18}
_Q4_K, _Q5_K, _Q6_K, _Q8_0 = 12, 13, 14, 8


@dataclass(frozen=True)
class QuantPreset:
    """An ftype plus per-tensor overrides ({regex: ggml_type}, first match wins)."""

    name: str
    ftype: int
    overrides: tuple[tuple[str, int], ...] = ()
    output_type: int | None = None
    description: str = ""


PRESETS = {name: QuantPreset(name, ft, description=f"llama.cpp {name.upper()}") for name, ft in _FTYPE.items()}
# MoE-aware: the routed experts hold ~95% of the weights but each token reads only top-k of them, so they
# take the low bits; everything every token reads (attention, shared expert, dense FFN, output) stays at 8 bits.
PRESETS["q4_k_moe"] = QuantPreset(
    "q4_k_moe", _FTYPE["q4_k_m"],
    overrides=((r"ffn_(gate|up)_exps", _Q4_K), (r"ffn_down_exps", _Q5_K), (r"_shexp", _Q8_0),
               (r"attn_(qkv|output)", _Q8_0), (r"ffn_(gate|up|down)\.weight", _Q8_0)),
    output_type=_Q8_0,
    description="routed experts Q4_K/Q5_K (down); attention, shared expert, dense FFN and output Q8_0",
)


def quantize(src: str | Path, dst: str | Path, preset: str, *, threads: int | None = None, force: bool = False) -> Path:
    """Quantize a llada2 GGUF (f32/f16/bf16) into ``dst`` atomically (``dst.part`` renamed at the end)."""
    if preset not in PRESETS:
        raise UsageError(f"unknown quantization {preset!r}", f"use one of {', '.join(PRESETS)}")
    src, dst = Path(src), Path(dst)
    inspect_gguf(src)
    if dst.exists() and not force:
        raise ConvertError(f"{dst} already exists", "pass --force to overwrite it")
    if dst.resolve() == src.resolve():
        raise ConvertError("the quantized output would overwrite its source", "choose another -o path")
    p = PRESETS[preset]
    lib = load_runtime().lib
    params = lib.llama_model_quantize_default_params()
    params.nthread = threads or os.cpu_count() or 1
    params.ftype = p.ftype
    params.allow_requantize = False
    if p.output_type is not None:
        params.output_tensor_type = p.output_type
    keep = []  # the C side borrows these buffers for the duration of the call
    if p.overrides:
        arr = (lib.llama_model_tensor_override * (len(p.overrides) + 1))()
        for i, (pattern, ggml_type) in enumerate(p.overrides):
            keep.append(ctypes.create_string_buffer(pattern.encode()))
            arr[i].pattern = ctypes.cast(keep[-1], ctypes.c_char_p)
            arr[i].type = ggml_type
        arr[len(p.overrides)].pattern = None
        params.tt_overrides = arr
        keep.append(arr)
    dst.parent.mkdir(parents=True, exist_ok=True)
    part = dst.with_name(dst.name + ".part")
    result: list[int] = []
    worker = threading.Thread(target=lambda: result.append(
        lib.llama_model_quantize(str(src).encode(), str(part).encode(), ctypes.byref(params))), daemon=True)
    try:
        worker.start()
        while worker.is_alive():  # join in slices so Ctrl-C reaches Python and the partial file is removed
            worker.join(0.2)
        if not result or result[0] != 0:
            raise ConvertError(f"llama_model_quantize failed for {src} -> {preset}",
                               "is the source already quantized? quantize from an f32/f16/bf16 GGUF")
        os.replace(part, dst)
    finally:
        part.unlink(missing_ok=True)
    return dst
