"""Hyper-parameters of the reference model, read from an HF ``config.json`` or from GGUF keys (spec §1.2, §2.1)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from dllm_cli import gguf_keys as K
from dllm_cli.errors import ModelError

DEFAULT_BLOCK_LENGTH = 32


@dataclass(frozen=True)
class RefConfig:
    """Everything the forward pass needs; field names follow the math, not either file format."""

    hidden: int
    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim: int
    rope_dim: int
    rope_theta: float
    eps: float
    n_dense: int  # leading dense layers (first_k_dense_replace)
    n_expert: int
    n_expert_used: int
    n_group: int
    n_group_used: int
    expert_scale: float
    expert_norm: bool
    n_vocab: int
    block_length: int = DEFAULT_BLOCK_LENGTH
    mask_id: int | None = None
    # LLaDA2.2 block routing (docs/LLADA22.md); expert_capacity 0 = per-token routing (2.0/2.1)
    expert_capacity: int = 0
    routing_block: int = 0
    # test knobs, never read from a file: which score is pooled ("biased" = sigmoid + expert bias, as the
    # sources say; "unbiased" = sigmoid only) and over what ("block" = each routing block; "forward" = every
    # token of the call, i.e. a pool leaking across blocks)
    pool_score: str = "biased"
    pool_scope: str = "block"

    def __post_init__(self) -> None:
        problems = []
        if self.n_head % self.n_head_kv:
            problems.append(f"n_head {self.n_head} is not a multiple of n_head_kv {self.n_head_kv}")
        if self.rope_dim % 2 or not 0 <= self.rope_dim <= self.head_dim:
            problems.append(f"rope_dim {self.rope_dim} must be even and at most head_dim {self.head_dim}")
        if self.n_layer > self.n_dense and (self.n_expert % max(self.n_group, 1)
                                             or not 1 <= self.n_group_used <= self.n_group
                                             or not 1 <= self.n_expert_used <= self.n_expert):
            problems.append(f"bad routing: {self.n_expert} experts, {self.n_group} groups "
                            f"(use {self.n_group_used}), top-{self.n_expert_used}")
        if self.block_length < 1:
            problems.append(f"block_length {self.block_length} must be positive")
        if self.expert_capacity and (not self.n_expert_used <= self.expert_capacity <= self.n_expert
                                     or self.routing_block < 1):
            problems.append(f"bad block routing: capacity {self.expert_capacity} of {self.n_expert} experts "
                            f"(top-{self.n_expert_used}), routing block {self.routing_block}")
        if self.pool_score not in ("biased", "unbiased") or self.pool_scope not in ("block", "forward"):
            problems.append(f"bad pool knobs {self.pool_score!r}/{self.pool_scope!r}")
        if problems:
            raise ModelError("invalid LLaDA2 configuration: " + "; ".join(problems),
                             "check the model's config.json or GGUF metadata")

    @property
    def n_rep(self) -> int:
        """Query heads served by each KV head (GQA)."""
        return self.n_head // self.n_head_kv


def config_from_hf(cfg: dict[str, Any], *, block_length: int = DEFAULT_BLOCK_LENGTH,
                   mask_id: int | None = None) -> RefConfig:
    """Map an HF ``LLaDA2MoeModelLM`` config dict; class defaults are never assumed (spec §1.2)."""
    def need(key: str) -> Any:
        if key not in cfg:
            raise ModelError(f"config.json lacks {key!r}", "use an official LLaDA2 config.json")
        return cfg[key]

    head_dim = cfg.get("head_dim") or need("hidden_size") // need("num_attention_heads")
    return RefConfig(
        hidden=int(need("hidden_size")), n_layer=int(need("num_hidden_layers")),
        n_head=int(need("num_attention_heads")), n_head_kv=int(need("num_key_value_heads")),
        head_dim=int(head_dim), rope_dim=int(head_dim * float(cfg.get("partial_rotary_factor", 1.0))),
        rope_theta=float(need("rope_theta")), eps=float(need("rms_norm_eps")),
        n_dense=int(need("first_k_dense_replace")), n_expert=int(need("num_experts")),
        n_expert_used=int(need("num_experts_per_tok")), n_group=int(cfg.get("n_group") or 1),
        n_group_used=int(cfg.get("topk_group") or 1), expert_scale=float(need("routed_scaling_factor")),
        expert_norm=bool(need("norm_topk_prob")), n_vocab=int(need("vocab_size")),
        block_length=int(cfg.get("block_length", block_length)),
        mask_id=cfg.get("mask_token_id", mask_id),
        expert_capacity=int(cfg.get("expert_capacity") or 0),
        routing_block=int(cfg.get("block_size") or 0) if cfg.get("expert_capacity") else 0,
    )


def mask_id_from_tokenizer(directory: str | Path) -> int | None:
    """The id of ``<|mask|>`` in ``tokenizer.json`` (it is not in config.json, spec §1.2), if present."""
    path = Path(directory) / "tokenizer.json"
    if not path.is_file():
        return None
    for tok in json.loads(path.read_text(encoding="utf-8")).get("added_tokens", []):
        if tok.get("content") == "<|mask|>":
            return int(tok["id"])
    return None


def _f32_value(x: Any) -> float:
    """GGUF stores these as float32: take the shortest decimal that rounds to it (1e-6, not 9.9999999747e-7),
    i.e. the config.json value the converter started from, so HF and GGUF models are bit-identical."""
    return float(str(np.float32(x)))


def config_from_gguf(get: Callable[[str], Any], n_vocab: int) -> RefConfig:
    """Build from ``llada2.*`` keys; ``get(key)`` returns the value or None when absent."""
    def need(key: str) -> Any:
        value = get(key)
        if value is None:
            raise ModelError(f"GGUF lacks key {key!r}", "re-convert the model with `dllm convert`")
        return value

    score = get(K.EXPERT_BLOCK_SCORE)
    if get(K.EXPERT_BLOCK_CAPACITY) and score != K.BLOCK_SCORE_BIASED:
        raise ModelError(f"GGUF block routing pools {score!r}; only {K.BLOCK_SCORE_BIASED!r} is implemented",
                         "re-convert the model with `dllm convert`")
    gating = get(K.EXPERT_GATING)
    if gating is not None and int(gating) != K.GATING_SIGMOID:
        raise ModelError(f"GGUF expert gating function {gating} is not sigmoid ({K.GATING_SIGMOID})",
                         "re-convert the model with `dllm convert`")
    mask_id = get(K.MASK_ID)
    return RefConfig(
        hidden=int(need(K.EMBEDDING_LENGTH)), n_layer=int(need(K.BLOCK_COUNT)),
        n_head=int(need(K.HEAD_COUNT)), n_head_kv=int(need(K.HEAD_COUNT_KV)),
        head_dim=int(need(K.KEY_LENGTH)), rope_dim=int(need(K.ROPE_DIM)),
        rope_theta=_f32_value(need(K.ROPE_FREQ_BASE)), eps=_f32_value(need(K.RMS_EPS)),
        n_dense=int(need(K.LEADING_DENSE)), n_expert=int(need(K.EXPERT_COUNT)),
        n_expert_used=int(need(K.EXPERT_USED)), n_group=int(get(K.EXPERT_GROUPS) or 1),
        n_group_used=int(get(K.EXPERT_GROUPS_USED) or 1), expert_scale=_f32_value(need(K.EXPERT_SCALE)),
        expert_norm=bool(need(K.EXPERT_NORM)), n_vocab=int(get(K.VOCAB_SIZE) or n_vocab),
        block_length=int(get(K.BLOCK_LENGTH) or DEFAULT_BLOCK_LENGTH),
        mask_id=None if mask_id is None else int(mask_id),
        expert_capacity=int(get(K.EXPERT_BLOCK_CAPACITY) or 0),
        routing_block=int(get(K.EXPERT_BLOCK_SIZE) or 0),
    )
