"""Write LLaDA2 checkpoints in the Hugging Face layout (config.json, safetensors, tokenizer).

``tiny_config`` + ``random_weights`` make the random test models; the demo training saves its
trained weights through ``write_checkpoint`` too, so every shipped GGUF goes through the converter.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from converters.safetensors import save_file
from dllm_cli.demo.tokenizer import SPECIAL_TOKENS, build_vocab, train_bpe, write_tokenizer

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.", "What is 12 plus 7? The answer is 19.",
    "Reverse the word hello: olleh", "Sort 3 1 2: 1 2 3", "Copy: banana banana",
    "Paris is the capital of France. Rome is the capital of Italy.", "def add(a, b):\n    return a + b\n",
]


def tiny_config(**overrides) -> dict:
    """A small LLaDA2MoeModelLM config; ``vocab_size`` is filled in by ``write_checkpoint``."""
    cfg = {
        "architectures": ["LLaDA2MoeModelLM"], "model_type": "llada2_moe", "_name_or_path": "tiny/LLaDA2.1-tiny",
        "hidden_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 16, "intermediate_size": 96, "moe_intermediate_size": 32, "num_experts": 8,
        "num_experts_per_tok": 2, "num_shared_experts": 1, "n_group": 2, "topk_group": 1,
        "routed_scaling_factor": 2.5, "norm_topk_prob": True, "score_function": "sigmoid",
        "moe_router_enable_expert_bias": True, "first_k_dense_replace": 1, "hidden_act": "silu",
        "rms_norm_eps": 1e-6, "rope_theta": 600000.0, "partial_rotary_factor": 0.5, "rope_scaling": None,
        "max_position_embeddings": 4096, "use_qk_norm": True, "use_qkv_bias": False, "use_bias": False,
        "tie_word_embeddings": False, "torch_dtype": "float32", "vocab_size": 0,
    }
    cfg.update(overrides)
    return cfg


def tensor_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Every HF tensor name of a LLaDA2 checkpoint with its shape (spec §2)."""
    h, v, d = cfg["hidden_size"], cfg["vocab_size"], cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    hq, hkv, e, m = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["num_experts"], cfg["moe_intermediate_size"]
    shapes: dict[str, tuple[int, ...]] = {"model.word_embeddings.weight": (v, h)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (h,), p + "attention.query_key_value.weight": ((hq + 2 * hkv) * d, h),
            p + "attention.query_layernorm.weight": (d,), p + "attention.key_layernorm.weight": (d,),
            p + "attention.dense.weight": (h, hq * d), p + "post_attention_layernorm.weight": (h,),
        })
        if i < cfg["first_k_dense_replace"]:
            f = cfg["intermediate_size"]
            shapes.update({p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h),
                           p + "mlp.down_proj.weight": (h, f)})
            continue
        shapes.update({p + "mlp.gate.weight": (e, h), p + "mlp.gate.expert_bias": (e,)})
        for x in range(e):
            q = f"{p}mlp.experts.{x}."
            shapes.update({q + "gate_proj.weight": (m, h), q + "up_proj.weight": (m, h), q + "down_proj.weight": (h, m)})
        s = m * cfg["num_shared_experts"]
        shapes.update({p + "mlp.shared_experts.gate_proj.weight": (s, h), p + "mlp.shared_experts.up_proj.weight": (s, h),
                       p + "mlp.shared_experts.down_proj.weight": (h, s)})
    shapes.update({"model.norm.weight": (h,), "lm_head.weight": (v, h)})
    return shapes


def random_weights(cfg: dict, seed: int = 0, head_scale: float = 1.0) -> dict[str, np.ndarray]:
    """Random float32 weights; ``head_scale`` sharpens the logits so thresholds and edits fire."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in tensor_shapes(cfg).items():
        if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
            w = 1.0 + 0.1 * rng.standard_normal(shape)
        elif name.endswith("expert_bias"):
            w = 0.05 * rng.standard_normal(shape)
        else:
            w = rng.standard_normal(shape) / np.sqrt(shape[-1])
            if name == "lm_head.weight":
                w *= head_scale
        out[name] = w.astype(np.float32)
    return out


def write_checkpoint(directory: str | Path, cfg: dict, weights: dict[str, np.ndarray] | None = None, *,
                     merges: list[tuple[str, str]] | None = None, seed: int = 0, head_scale: float = 1.0,
                     shards: int = 1, bf16: bool = False, vocab_pad: int = 13) -> dict:
    """Write a complete HF checkpoint directory and return the config actually written.

    Without ``weights`` the model is random (seeded). ``vocab_size`` becomes the tokenizer size plus
    ``vocab_pad`` unused rows, as the real LLaDA2 vocabulary has padding rows.
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    vocab = write_tokenizer(d, merges if merges is not None else train_bpe(_CORPUS, 40))
    cfg = dict(cfg)
    if weights is None or not cfg.get("vocab_size"):
        cfg["vocab_size"] = len(vocab) + vocab_pad
    cfg.setdefault("pad_token_id", vocab["<|endoftext|>"])
    cfg["eos_token_id"] = vocab["<|endoftext|>"]
    if weights is None:
        weights = random_weights(cfg, seed, head_scale)
    (d / "config.json").write_text(json.dumps(cfg, indent=1))
    names = list(weights)
    keep_f32 = {n for n in names if n.endswith("expert_bias")}
    per = -(-len(names) // shards)
    index = {}
    for s in range(shards):
        part = names[s * per:(s + 1) * per]
        fname = "model.safetensors" if shards == 1 else f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: weights[n] for n in part}, d / fname, bf16=frozenset(part) - keep_f32 if bf16 else frozenset())
        index.update({n: fname for n in part})
    if shards > 1:
        (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    return cfg


__all__ = ["SPECIAL_TOKENS", "tiny_config", "tensor_shapes", "random_weights", "write_checkpoint"]


def checkpoint_from_gguf(gguf_path: str | Path, directory: str | Path, model_cfg: dict) -> dict:
    """Rebuild the HF checkpoint a demo GGUF (f32) was converted from: the inverse of ``converters.llada2``.

    ``model_cfg`` is the architecture the GGUF was trained with (``train.MODEL``); the vocabulary size comes
    from the GGUF. Every tensor is copied exactly (f32), the merges come from ``tokenizer.ggml.merges``, so a
    later stage can continue the shipped model (``train.py --init demo.gguf``) without its training directory.
    """
    from gguf import GGUFReader

    from converters.llada2 import EXPERT_MAP, GLOBAL_MAP, LAYER_MAP

    reader = GGUFReader(str(gguf_path))
    merges = [tuple(m.split(" ", 1)) for m in reader.fields["tokenizer.ggml.merges"].contents()]
    gguf_w = {}
    for t in reader.tensors:
        shape = tuple(int(n) for n in reversed(t.shape.tolist()))
        if t.tensor_type.name != "F32":
            raise ValueError(f"{gguf_path}: tensor {t.name} is {t.tensor_type.name}; only f32 demo GGUFs can be continued")
        gguf_w[t.name] = np.array(t.data, dtype=np.float32).reshape(shape)
    weights: dict[str, np.ndarray] = {hf: gguf_w.pop(g) for hf, g in GLOBAL_MAP.items()}
    cfg = tiny_config(**model_cfg, vocab_size=int(weights["model.word_embeddings.weight"].shape[0]))
    for i in range(cfg["num_hidden_layers"]):
        for hf, g in LAYER_MAP.items():
            if f"blk.{i}.{g}" in gguf_w:
                weights[f"model.layers.{i}.{hf}"] = gguf_w.pop(f"blk.{i}.{g}")
        for proj, g in EXPERT_MAP.items():
            if f"blk.{i}.{g}" in gguf_w:
                stacked = gguf_w.pop(f"blk.{i}.{g}")
                for e in range(stacked.shape[0]):
                    weights[f"model.layers.{i}.mlp.experts.{e}.{proj}"] = np.ascontiguousarray(stacked[e])
    if gguf_w:
        raise ValueError(f"{gguf_path}: unmapped tensors {sorted(gguf_w)[:3]}")
    expected = tensor_shapes(cfg)
    if {n: w.shape for n, w in weights.items()} != expected:
        raise ValueError(f"{gguf_path} does not match the demo architecture")
    vocab = build_vocab(merges)
    cfg["pad_token_id"] = vocab["<|endoftext|>"]
    return write_checkpoint(directory, cfg, {n: weights[n] for n in expected}, merges=merges)
