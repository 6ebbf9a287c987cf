"""Load a ``RefModel`` from an HF checkpoint directory or from one of our GGUFs.

Both loaders produce the same weights dict: GGUF tensor names (spec §2.1), numpy shapes in the
PyTorch ``[out, in]`` convention, routed experts stacked ``[E, out, in]``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from dllm_cli import gguf_keys as K
from dllm_cli.errors import ModelError
from dllm_cli.reference.config import RefConfig, config_from_gguf, config_from_hf, mask_id_from_tokenizer
from dllm_cli.reference.model import RefModel

# HF name suffix (after ``model.layers.{i}.``) -> GGUF name suffix (after ``blk.{i}.``)
_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "attention.query_key_value.weight": "attn_qkv.weight",
    "attention.query_layernorm.weight": "attn_q_norm.weight",
    "attention.key_layernorm.weight": "attn_k_norm.weight",
    "attention.dense.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}
_DENSE_NAMES = {f"mlp.{n}_proj.weight": f"ffn_{n}.weight" for n in ("gate", "up", "down")}
_MOE_NAMES = {
    "mlp.gate.weight": "ffn_gate_inp.weight",
    "mlp.gate.expert_bias": "exp_probs_b.bias",
    **{f"mlp.shared_experts.{n}_proj.weight": f"ffn_{n}_shexp.weight" for n in ("gate", "up", "down")},
}


def hf_to_weights(get, names: set[str], cfg: RefConfig, dtype: type) -> dict[str, np.ndarray]:
    """Rename (and stack experts of) HF tensors; ``get(name, dtype)`` reads one. Leftovers are an error."""
    def take(hf: str) -> np.ndarray:
        if hf not in names:
            raise ModelError(f"checkpoint lacks tensor {hf!r}", "re-download the checkpoint")
        names.discard(hf)
        return get(hf, dtype)

    out = {"token_embd.weight": take("model.word_embeddings.weight"),
           "output_norm.weight": take("model.norm.weight"), "output.weight": take("lm_head.weight")}
    for i in range(cfg.n_layer):
        p, q = f"model.layers.{i}.", f"blk.{i}."
        table = {**_LAYER_NAMES, **(_DENSE_NAMES if i < cfg.n_dense else _MOE_NAMES)}
        for hf, gg in table.items():
            if gg.endswith("_shexp.weight") and p + hf not in names:
                continue  # num_shared_experts == 0
            out[q + gg] = take(p + hf)
        if i >= cfg.n_dense:
            for n in ("gate", "up", "down"):
                out[q + f"ffn_{n}_exps.weight"] = np.stack(
                    [take(f"{p}mlp.experts.{e}.{n}_proj.weight") for e in range(cfg.n_expert)])  # [E, out, in]
    if names:
        raise ModelError(f"checkpoint has {len(names)} unexpected tensors, e.g. {sorted(names)[:3]}",
                         "this does not look like a LLaDA2 checkpoint")
    return out


def load_hf(directory: str | Path, dtype: type = np.float64, *, block_length: int | None = None) -> RefModel:
    """Read ``config.json`` + safetensors of an HF ``LLaDA2MoeModelLM`` checkpoint."""
    from converters.safetensors import Checkpoint  # the converters package is a sibling top-level package

    d = Path(directory)
    try:
        raw: dict[str, Any] = json.loads((d / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot read {d / 'config.json'}: {e}", "point at an HF checkpoint directory") from None
    extra = {} if block_length is None else {"block_length": block_length}
    cfg = config_from_hf(raw, mask_id=mask_id_from_tokenizer(d), **extra)
    ckpt = Checkpoint(d)
    return RefModel(cfg, hf_to_weights(ckpt.get, set(ckpt.names()), cfg, dtype), dtype)


def _field_value(field) -> Any:
    value = field.contents()
    return value.item() if isinstance(value, np.generic) else value


def load_gguf(path: str | Path, dtype: type = np.float64) -> RefModel:
    """Read a GGUF written by our converter (arch ``llada2``); every tensor type is dequantized."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot read GGUF {path}: {e}", "re-convert the model with `dllm convert`") from None

    def get(key: str) -> Any:
        f = reader.fields.get(key)
        return None if f is None else _field_value(f)

    arch = get("general.architecture")
    if arch != K.ARCH:
        raise ModelError(f"{path} has architecture {arch!r}, not {K.ARCH!r}", "convert a LLaDA2 model")
    weights: dict[str, np.ndarray] = {}
    for t in reader.tensors:
        shape = tuple(int(n) for n in reversed(t.shape.tolist()))  # ggml ne reversed = numpy shape
        plain = t.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F64)
        w = t.data if plain else gguf.quants.dequantize(t.data, t.tensor_type)  # float32 for quantized types
        weights[t.name] = np.asarray(w).reshape(shape).astype(dtype)
    if "token_embd.weight" not in weights:
        raise ModelError(f"{path} lacks token_embd.weight", "re-convert the model with `dllm convert`")
    cfg = config_from_gguf(get, n_vocab=weights["token_embd.weight"].shape[0])
    return RefModel(cfg, weights, dtype)
