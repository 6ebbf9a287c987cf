"""The LLaDA2 architecture in PyTorch, for training the embedded demo model (spec §3).

Module and parameter names mirror the Hugging Face checkpoint, so ``state_dict()`` keys are the real
LLaDA2 tensor names (``model.layers.1.mlp.experts.3.up_proj.weight`` ...). The math is the one the
numpy reference and the patched llama.cpp compute: fused QKV, per-head RMS qk-norm before partial NeoX
RoPE, layer-0 dense SwiGLU, group-limited sigmoid top-k MoE with a selection-only expert bias, weights
normalised with llama.cpp's floor and scaled, plus a shared expert; untied head; no biases anywhere.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

WEIGHT_SUM_FLOOR = 6.103515625e-5  # llama.cpp's clamp of the top-k weight sum (2^-14)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


class SwiGLU(nn.Module):
    def __init__(self, hidden: int, inter: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def rope_tables(positions: torch.Tensor, rope_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin ``[S, rope_dim/2]`` computed in float64 like the reference, then cast to float32."""
    inv = theta ** (-torch.arange(0, rope_dim, 2, dtype=torch.float64) / rope_dim)
    ang = positions.to(torch.float64)[:, None] * inv[None, :]
    return torch.cos(ang).float(), torch.sin(ang).float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """NeoX partial RoPE on ``x [B, S, H, D]``: dim j pairs with j + half for j < half; the rest pass."""
    half = cos.shape[-1]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    x1, x2, rest = x[..., :half], x[..., half:2 * half], x[..., 2 * half:]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s, rest], dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: dict) -> None:
        super().__init__()
        self.hq, self.hkv, self.d = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
        h = cfg["hidden_size"]
        self.query_key_value = nn.Linear(h, (self.hq + 2 * self.hkv) * self.d, bias=False)
        self.query_layernorm = RMSNorm(self.d, cfg["rms_norm_eps"])
        self.key_layernorm = RMSNorm(self.d, cfg["rms_norm_eps"])
        self.dense = nn.Linear(self.hq * self.d, h, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        qkv = self.query_key_value(x).view(b, s, self.hq + 2 * self.hkv, self.d)
        q, k, v = qkv.split([self.hq, self.hkv, self.hkv], dim=2)
        q = apply_rope(self.query_layernorm(q), cos, sin)
        k = apply_rope(self.key_layernorm(k), cos, sin)
        rep = self.hq // self.hkv  # kv head g serves query heads [g*rep, (g+1)*rep)
        k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
        return self.dense(o.transpose(1, 2).reshape(b, s, self.hq * self.d))


class Gate(nn.Module):
    """Router weight plus the selection-only ``expert_bias`` buffer (updated by aux-loss-free balancing)."""

    def __init__(self, hidden: int, n_expert: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_expert, hidden))
        self.register_buffer("expert_bias", torch.zeros(n_expert))


class MoE(nn.Module):
    def __init__(self, cfg: dict) -> None:
        super().__init__()
        h, m, e = cfg["hidden_size"], cfg["moe_intermediate_size"], cfg["num_experts"]
        self.k, self.n_group, self.topk_group = cfg["num_experts_per_tok"], cfg["n_group"], cfg["topk_group"]
        self.scale = cfg["routed_scaling_factor"]
        self.gate = Gate(h, e)
        self.experts = nn.ModuleList(SwiGLU(h, m) for _ in range(e))
        self.shared_experts = SwiGLU(h, m * cfg["num_shared_experts"])
        self.load = torch.zeros(e)  # tokens per expert since the last bias update

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert ids ``[T, k]`` and weights ``[T, k]`` (spec §3.6)."""
        t, e = x.shape[0], self.gate.weight.shape[0]
        s = torch.sigmoid(x @ self.gate.weight.t())
        sel = s + self.gate.expert_bias
        if self.n_group > 1:
            grouped = sel.view(t, self.n_group, e // self.n_group)
            score = grouped.topk(min(2, e // self.n_group), dim=-1).values.sum(-1)
            keep = torch.zeros_like(score, dtype=torch.bool)
            keep.scatter_(1, score.topk(self.topk_group, dim=-1).indices, True)
            sel = sel.masked_fill(~keep.repeat_interleave(e // self.n_group, dim=1), float("-inf"))
        ids = sel.topk(self.k, dim=-1).indices
        w = s.gather(1, ids)
        w = w / w.sum(-1, keepdim=True).clamp_min(WEIGHT_SUM_FLOOR)
        return ids, w * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        ids, w = self.route(x)
        y = torch.zeros_like(x)
        for ex, expert in enumerate(self.experts):
            tok, slot = (ids == ex).nonzero(as_tuple=True)
            self.load[ex] += tok.numel()
            if tok.numel():
                y = y.index_add(0, tok, w[tok, slot, None] * expert(x[tok]))
        return (y + self.shared_experts(x)).view(shape)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: dict, i: int) -> None:
        super().__init__()
        eps = cfg["rms_norm_eps"]
        self.input_layernorm = RMSNorm(cfg["hidden_size"], eps)
        self.attention = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg["hidden_size"], eps)
        dense = i < cfg["first_k_dense_replace"]
        self.mlp = SwiGLU(cfg["hidden_size"], cfg["intermediate_size"]) if dense else MoE(cfg)

    def forward(self, h, cos, sin, mask):
        h = h + self.attention(self.input_layernorm(h), cos, sin, mask)
        return h + self.mlp(self.post_attention_layernorm(h))


class Backbone(nn.Module):
    def __init__(self, cfg: dict) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg["vocab_size"], cfg["hidden_size"])
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg["num_hidden_layers"]))
        self.norm = RMSNorm(cfg["hidden_size"], cfg["rms_norm_eps"])


def block_causal(n: int, block: int) -> torch.Tensor:
    """Boolean ``[n, n]`` mask: query p may attend key q iff q // B <= p // B (spec §3.4)."""
    b = torch.arange(n) // block
    return b[None, :] <= b[:, None]


class LLaDA2(nn.Module):
    """``LLaDA2MoeModelLM``: ``forward(ids [B, S]) -> logits [B, S, V]``, row i predicting token i."""

    def __init__(self, cfg: dict) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg["hidden_size"], cfg["vocab_size"], bias=False)
        self.rope_dim = int(cfg["head_dim"] * cfg["partial_rotary_factor"])
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = self.cfg.get("initializer_range", 0.02)
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                nn.init.normal_(p, std=std)
                if name.endswith(("dense.weight", "down_proj.weight")):  # GPT-2 style residual scaling
                    p.data /= math.sqrt(2 * self.cfg["num_hidden_layers"])

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        s = ids.shape[1]
        cos, sin = rope_tables(torch.arange(s), self.rope_dim, self.cfg["rope_theta"])
        if mask is None:
            mask = block_causal(s, self.cfg.get("block_length", 32))
        h = self.model.word_embeddings(ids)
        for layer in self.model.layers:
            h = layer(h, cos, sin, mask)
        return self.lm_head(self.model.norm(h))

    def moe_layers(self) -> list[MoE]:
        return [layer.mlp for layer in self.model.layers if isinstance(layer.mlp, MoE)]

    @torch.no_grad()
    def update_expert_bias(self, rate: float) -> None:
        """Aux-loss-free balancing: nudge under-loaded experts up and over-loaded ones down."""
        for moe in self.moe_layers():
            moe.gate.expert_bias += rate * torch.sign(moe.load.mean() - moe.load)
            moe.load.zero_()

    def numpy_weights(self) -> dict:
        """``state_dict`` as float32 numpy arrays under the HF tensor names."""
        return {n: t.detach().float().cpu().numpy().copy() for n, t in self.state_dict().items()}


__all__ = ["LLaDA2", "block_causal", "WEIGHT_SUM_FLOOR"]
