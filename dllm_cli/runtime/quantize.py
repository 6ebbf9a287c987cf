"""K-quants and the MoE-aware preset through the patched library's ``llama_model_quantize``.

The router (``ffn_gate_inp``), ``exp_probs_b`` and all norms are never quantized by llama.cpp (1-D or
excluded by name), so they stay F32 as the converter wrote them.
"""
from __future__ import annotations

import ctypes
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from dllm_cli import outfiles
from dllm_cli.errors import ConvertError, DllmError, OutputError, UsageError
from dllm_cli.runtime.library import load as load_runtime
from dllm_cli.runtime.model import inspect_gguf

# llama_ftype and ggml_type values (include/llama.h, ggml.h of the pinned tree)
_FTYPE = {"q4_0": 2, "q8_0": 7, "q4_k_m": 15, "q5_k_m": 17, "q6_k": 18}
_Q4_K, _Q5_K, _Q6_K, _Q8_0 = 12, 13, 14, 8
LOW_DISK = 64 * 2**20  # free bytes under which a failed quantization is blamed on the disk


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
    """Quantize a llada2 GGUF (f32/f16/bf16) into ``dst`` atomically (written in a ``.part`` directory next to
    it, renamed at the end, removed on any failure or interrupt)."""
    if preset not in PRESETS:
        raise UsageError(f"unknown quantization {preset!r}", f"use one of {', '.join(PRESETS)}")
    src, dst = Path(src), outfiles.expand(dst)
    inspect_gguf(src)
    dst = outfiles.check(dst, what="the quantized GGUF", need_bytes=src.stat().st_size // 8, create_parent=True)
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
    # llama.cpp writes into a private directory next to dst: if we are interrupted before the C call has
    # created its file, removing the directory makes that later open fail instead of leaving a stray file.
    try:
        staging = Path(tempfile.mkdtemp(prefix=outfiles.temp_prefix(dst), suffix=outfiles.PART_SUFFIX, dir=dst.parent))
    except OSError as e:
        raise outfiles.write_error(dst, e, "the quantized GGUF") from None
    part = staging / dst.name
    result: list[int] = []
    worker = threading.Thread(target=lambda: result.append(
        lib.llama_model_quantize(os.fsencode(src), os.fsencode(part), ctypes.byref(params))), daemon=True)
    try:
        worker.start()
        while worker.is_alive():  # join in slices so Ctrl-C / SIGTERM reach Python and the partial file goes
            worker.join(0.2)
        if not result or result[0] != 0:
            raise _failure(src, dst, preset)
        try:
            os.replace(part, dst)
        except OSError as e:
            raise outfiles.write_error(dst, e, "the quantized GGUF") from None
    finally:
        _remove_tree(staging)
    return dst


def _failure(src: Path, dst: Path, preset: str) -> DllmError:
    """Why llama_model_quantize returned an error (it only logs the reason): a quantized source, a full disk,
    or something else (then llama.cpp's log says, with DLLM_VERBOSE=1)."""
    if _quantized(src):
        return ConvertError(f"{src} is already quantized; llama.cpp does not requantize",
                            "quantize from an f32/f16/bf16 GGUF")
    free = outfiles.free_bytes(dst.parent)
    if free is not None and free < LOW_DISK:
        return OutputError(f"cannot write the quantized GGUF to {dst}: no space left on the device "
                           f"({free / 1e6:.1f} MB free)", "free disk space or choose another -o")
    return ConvertError(f"llama_model_quantize failed for {src} -> {preset}",
                        "rerun with DLLM_VERBOSE=1 to see llama.cpp's reason")


def _quantized(src: Path) -> bool:
    """True when a 2-D weight of ``src`` is already in a quantized type."""
    import gguf

    try:
        reader = gguf.GGUFReader(src, "r")
    except Exception:  # inspect_gguf accepted it; a reader failure here just means "cannot tell"
        return False
    plain = {gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.BF16}
    return any(t.tensor_type not in plain for t in reader.tensors if len(t.shape) > 1)


def _remove_tree(path: Path) -> None:
    """Remove the staging directory; never raises (it runs while an interrupt unwinds)."""
    for _ in range(3):  # the C call may still be creating its file while we interrupt it
        shutil.rmtree(path, ignore_errors=True)
        if not path.exists():
            return
        time.sleep(0.05)
