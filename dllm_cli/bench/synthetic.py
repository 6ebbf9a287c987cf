"""Random-weight LLaDA2 GGUFs with the real shapes, for benchmarking without the real checkpoints.

The f16 file is written tensor by tensor in row chunks (never the whole model in RAM) with the converter's
tensor names, hyper-parameter keys and a padded vocabulary, then quantized through
``dllm_cli.runtime.quantize``. Files are cached under ``$DLLM_HOME/synthetic/``.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from dllm_cli import outfiles
from dllm_cli.errors import UsageError

# spec §1.2: LLaDA2.0/2.1 mini and flash (all fields the converter needs)
_COMMON: dict[str, Any] = {
    "architectures": ["LLaDA2MoeModelLM"], "model_type": "llada2_moe", "vocab_size": 157184, "head_dim": 128,
    "num_key_value_heads": 4, "num_experts": 256, "num_experts_per_tok": 8, "num_shared_experts": 1,
    "n_group": 8, "topk_group": 4, "routed_scaling_factor": 2.5, "norm_topk_prob": True,
    "score_function": "sigmoid", "moe_router_enable_expert_bias": True, "first_k_dense_replace": 1,
    "hidden_act": "silu", "rms_norm_eps": 1e-6, "rope_theta": 600000.0, "partial_rotary_factor": 0.5,
    "rope_scaling": None, "max_position_embeddings": 32768, "use_qk_norm": True, "use_qkv_bias": False,
    "use_bias": False, "tie_word_embeddings": False,
}
SHAPES: dict[str, dict[str, Any]] = {
    "llada2-mini": {**_COMMON, "hidden_size": 2048, "num_hidden_layers": 20, "num_attention_heads": 16,
                    "intermediate_size": 5120, "moe_intermediate_size": 512},
    "llada2-flash": {**_COMMON, "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
                     "intermediate_size": 9216, "moe_intermediate_size": 1024},
}
# LLaDA2.2-mini: the mini shapes (no 2.2-mini config.json was available) with block routing, C = 48 of 256 experts
# per 32-token routing block, and the 128K context (docs/LLADA22.md)
SHAPES["llada2.2-mini"] = {**SHAPES["llada2-mini"], "expert_capacity": 48, "block_size": 32,
                           "max_position_embeddings": 131072}
CHUNK = 1 << 24  # elements generated at a time (64 MiB of float32)
EDIT_IDS = (156930, 156931)  # LLaDA2.2 DELETE / SPLIT ids of the real config (docs/LLADA22.md)
# a cached file of an older layout would not open: bump a shape's revision when its keys change
REVISION = {"llada2.2-mini": "-r2"}  # r2: DELETE/SPLIT ids and the indel presets


@dataclass(frozen=True)
class SyntheticModel:
    path: Path
    shape: str
    layers: int
    quant: str
    config: dict[str, Any]


def synthetic_config(shape: str, layers: int | None = None, **overrides: Any) -> dict[str, Any]:
    """The config.json values of ``shape`` (``llada2-mini``/``llada2-flash``), truncated to ``layers``."""
    if shape not in SHAPES:
        raise UsageError(f"unknown synthetic shape {shape!r}", f"use one of {', '.join(SHAPES)}")
    cfg = dict(SHAPES[shape])
    if layers is not None:
        if layers < 1:
            raise UsageError(f"--layers must be >= 1, got {layers}")
        cfg["num_hidden_layers"] = layers
    cfg.update(overrides)
    return cfg


def synthetic_path(shape: str, layers: int, quant: str, tag: str = "") -> Path:
    from dllm_cli.registry import dllm_home

    return dllm_home() / "synthetic" / f"{shape}{REVISION.get(shape, '')}{tag}-L{layers}-{quant}.gguf"


def build_synthetic(shape: str = "llada2-mini", *, layers: int | None = None, quant: str = "q4_k_m",
                    seed: int = 0, overrides: dict[str, Any] | None = None, force: bool = False,
                    progress: Callable[[str, int, int], None] | None = None) -> SyntheticModel:
    """Build (or reuse from the cache) a random-weight GGUF; ``quant`` is ``f16`` or a quantize preset.

    ``overrides`` replace config values (tests shrink the model with them); they change the cache name.
    """
    cfg = synthetic_config(shape, layers, **(overrides or {}))
    n_layers = int(cfg["num_hidden_layers"])
    tag = "-" + hashlib.sha1(json.dumps(overrides, sort_keys=True).encode()).hexdigest()[:8] if overrides else ""
    out = synthetic_path(shape, n_layers, quant, tag)
    if out.is_file() and not force:
        return SyntheticModel(out, shape, n_layers, quant, cfg)
    f16 = synthetic_path(shape, n_layers, "f16", tag)
    if force or not f16.is_file():
        outfiles.check(f16, what="the synthetic model", create_parent=True)  # $DLLM_HOME may be unwritable
        try:
            write_random_gguf(f16, cfg, seed=seed, name=f"synthetic-{shape}-L{n_layers}", progress=progress)
        except OSError as e:  # write_random_gguf already removed its .part file
            raise outfiles.write_error(f16, e, "the synthetic model") from None
    if quant != "f16":
        from dllm_cli.runtime.quantize import quantize

        if progress:
            progress(f"quantize {quant}", 0, 1)
        quantize(f16, out, quant, force=True)
        if progress:
            progress(f"quantize {quant}", 1, 1)
    return SyntheticModel(out, shape, n_layers, quant, cfg)


def _vocab(n_vocab: int) -> Any:
    """A byte-level BPE vocabulary with LLaDA2's special tokens, padded to ``n_vocab`` rows."""
    from converters.vocab import load_vocab
    from dllm_cli.demo.checkpoint import _CORPUS
    from dllm_cli.demo.tokenizer import train_bpe, write_tokenizer

    with tempfile.TemporaryDirectory() as d:
        write_tokenizer(Path(d), train_bpe(_CORPUS, 40))
        return load_vocab(Path(d), n_vocab)


def _init(name: str, shape: tuple[int, ...], rng: np.random.Generator, rows: int) -> np.ndarray:
    """``rows`` rows of a tensor: norms 1, expert bias small, matrices N(0, 1/fan_in)."""
    cols = shape[-1]
    if name.endswith("norm.weight"):
        return np.ones((rows, cols), np.float32)
    if name.endswith("exp_probs_b.bias"):
        return 0.05 * rng.standard_normal((rows, cols), dtype=np.float32)
    return rng.standard_normal((rows, cols), dtype=np.float32) * np.float32(1.0 / np.sqrt(cols))


def write_random_gguf(path: Path, cfg: dict[str, Any], *, seed: int = 0, name: str = "synthetic",
                      progress: Callable[[str, int, int], None] | None = None) -> Path:
    """Stream an f16 GGUF of random weights with the converter's names and keys (norms/router stay F32)."""
    from gguf import GGUFWriter

    from converters.base import OutType, file_type_of, tensor_nbytes, tensor_qtype
    from converters.llada2 import KEEP_F32, LLaDA2
    from converters.vocab import write_vocab
    from dllm_cli import gguf_keys as K
    from dllm_cli.registry import version_presets

    arch = LLaDA2(cfg, ckpt=None)  # type: ignore[arg-type]  # only shapes and keys are used
    plans = [(g, shape, tensor_qtype(shape, OutType.F16, g.endswith(KEEP_F32)))
             for g, (shape, _) in arch.expected().items()]
    vocab = _vocab(arch.hp.vocab)
    from dllm_cli import outfiles

    writer = GGUFWriter(None, K.ARCH)  # the file is opened below, where its cleanup starts
    writer.add_name(name)
    writer.add_file_type(file_type_of(OutType.F16))
    writer.add_quantization_version(2)
    arch.write_kv(writer)
    version = "2.2" if arch.hp.capacity else "2.1"
    writer.add_string(K.MODEL_VERSION, version)
    for mode, preset in version_presets(version).items():
        writer.add_float32(K.preset_key(mode, "threshold"), preset.threshold)
        writer.add_float32(K.preset_key(mode, "editing_threshold"), preset.editing_threshold)
        writer.add_uint32(K.preset_key(mode, "max_post_steps"), preset.max_post_steps)
        writer.add_bool(K.preset_key(mode, "editing"), preset.editing)
    write_vocab(writer, vocab)
    if version == "2.2":  # after the vocabulary, where the converter writes them
        n = len(vocab.tokens)  # a shrunk test vocabulary takes its last two padding rows instead
        edit_ids = EDIT_IDS if n > max(EDIT_IDS) else (n - 2, n - 1)
        writer.add_uint32(K.DELETE_ID, edit_ids[0])
        writer.add_uint32(K.SPLIT_ID, edit_ids[1])
        for mode, preset in version_presets(version).items():
            writer.add_bool(K.preset_key(mode, "indel"), preset.indel)
    for g, shape, qt in plans:
        writer.add_tensor_info(g, shape, np.dtype(np.float32), tensor_nbytes(shape, qt), raw_dtype=qt)
    rng = np.random.default_rng(seed)
    part = outfiles.new_part(path, "the synthetic model")  # unique: two benches may build the same model
    try:
        writer.open_output_file(part)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        fout = writer.fout[0]  # type: ignore[index]
        for i, (g, shape, qt) in enumerate(plans):
            writer.write_padding(fout, fout.tell())
            rows = int(np.prod(shape[:-1], dtype=np.int64)) if len(shape) > 1 else 1
            step = max(1, CHUNK // shape[-1])
            dtype = np.float16 if qt.name == "F16" else np.float32
            written = 0
            for r0 in range(0, rows, step):
                x = _init(g, shape, rng, min(step, rows - r0)).astype(dtype, copy=False)
                x.tofile(fout)
                written += x.nbytes
            assert written == tensor_nbytes(shape, qt), (g, written)
            writer.write_padding(fout, written)
            if progress:
                progress(f"write {g}", i + 1, len(plans))
        fout.flush()
        os.fsync(fout.fileno())
    except BaseException:
        writer.close()
        part.unlink(missing_ok=True)
        raise
    writer.close()
    outfiles.commit(part, path, "the synthetic model")
    return path
