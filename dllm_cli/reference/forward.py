"""The LLaDA2 forward pass as pure numpy functions (spec §3), written to be read next to the math.

Weights live in a flat dict keyed by GGUF tensor names (spec §2.1) with numpy shapes in the PyTorch
``[out, in]`` convention; routed experts are stacked ``[E, out, in]``. Every function computes in the
dtype of its inputs (float32 or float64), so a float64 model is an exact-as-possible oracle.
"""
from __future__ import annotations

from typing import Mapping, NamedTuple, Sequence

import numpy as np

from dllm_cli.reference.config import RefConfig

Weights = Mapping[str, np.ndarray]

# llama.cpp clamps the top-k weight sum to >= 2^-14 before dividing (build_moe_ffn); dInfer/HF add 1e-20
# instead. The runtime is what this oracle is compared with, so the llama.cpp form is used.
WEIGHT_SUM_FLOOR = 6.103515625e-5


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Numerically stable softmax; rows may contain -inf (masked) entries."""
    z = x - np.max(x, axis=axis, keepdims=True)  # [..., n]
    e = np.exp(z)  # [..., n]
    return e / np.sum(e, axis=axis, keepdims=True)  # [..., n]


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))  # [...]


def silu(x: np.ndarray) -> np.ndarray:
    return x * sigmoid(x)  # [...]


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    """RMSNorm over the last axis: ``w * x / sqrt(mean(x^2) + eps)``."""
    inv = 1.0 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)  # [..., 1]
    return w * (x * inv)  # [..., n]


def rope_neox(x: np.ndarray, pos: np.ndarray, rope_dim: int, theta: float) -> np.ndarray:
    """Partial NeoX RoPE: dims [0, rope_dim) rotate, dim j pairs with j + rope_dim/2; the rest pass through."""
    half = rope_dim // 2
    if half == 0:
        return x
    inv_freq = theta ** (-np.arange(0, rope_dim, 2, dtype=np.float64) / rope_dim)  # [half]
    ang = pos.astype(np.float64)[:, None] * inv_freq[None, :]  # [S, half]
    cos = np.cos(ang).astype(x.dtype)[:, None, :]  # [S, 1, half]
    sin = np.sin(ang).astype(x.dtype)[:, None, :]  # [S, 1, half]
    x1, x2, rest = x[..., :half], x[..., half:rope_dim], x[..., rope_dim:]  # [S, H, half] x2, [S, H, D-rot]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], axis=-1)  # [S, H, D]


def block_causal_mask(q_pos: np.ndarray, k_pos: np.ndarray, block_length: int) -> np.ndarray:
    """Additive mask: query at p sees key at q iff q // B <= p // B (blocks aligned at position 0, spec §3.4)."""
    see = (np.asarray(k_pos)[None, :] // block_length) <= (np.asarray(q_pos)[:, None] // block_length)  # [S, T]
    return np.where(see, 0.0, -np.inf)  # [S, T]


def causal_mask(q_pos: np.ndarray, k_pos: np.ndarray) -> np.ndarray:
    """Additive token-causal mask: query at p sees key at q iff q <= p."""
    return np.where(np.asarray(k_pos)[None, :] <= np.asarray(q_pos)[:, None], 0.0, -np.inf)  # [S, T]


def swiglu(x: np.ndarray, w_gate: np.ndarray, w_up: np.ndarray, w_down: np.ndarray) -> np.ndarray:
    """``down(silu(gate x) * up x)``; weights in [out, in] layout."""
    g = x @ w_gate.T  # [T, I]
    u = x @ w_up.T  # [T, I]
    return (silu(g) * u) @ w_down.T  # [T, H]


class Route(NamedTuple):
    """The router's decision for T tokens: expert ids (best selection score first) and their weights."""

    ids: np.ndarray  # [T, k] int64
    weights: np.ndarray  # [T, k]


def block_pool(score: np.ndarray, block_ids: np.ndarray, capacity: int) -> np.ndarray:
    """LLaDA2.2 block routing: per routing block, the ``capacity`` experts with the highest max-over-tokens score.

    Returns the allowed-expert mask [T, E] (each token gets its block's pool). Ties break toward the lower index.
    """
    allowed = np.zeros(score.shape, dtype=bool)  # [T, E]
    for b in np.unique(block_ids):
        rows = block_ids == b  # [T]
        g = score[rows].max(axis=0)  # [E] "token racing": each expert's best score in the block
        pool = np.argsort(-g, kind="stable")[:capacity]  # [C]
        allowed[np.ix_(rows, pool)] = True
    return allowed


def route(x: np.ndarray, w_gate: np.ndarray, expert_bias: np.ndarray | None, *, n_expert_used: int,
          n_group: int = 1, n_group_used: int = 1, expert_norm: bool = True, expert_scale: float = 1.0,
          block_ids: np.ndarray | None = None, capacity: int = 0, pool_score: str = "biased") -> Route:
    """Group-limited sigmoid top-k routing (spec §3.6), or LLaDA2.2 block routing when ``capacity`` > 0.

    The bias only steers selection; weights are the original sigmoid scores of the chosen experts.
    Block routing (docs/LLADA22.md): tokens with equal ``block_ids`` share a pool of ``capacity`` experts
    chosen by the max over their tokens of the biased score; each token then takes its top-k of the biased
    score inside the pool, without the group restriction. Ties break toward the lower index (stable sorts).
    """
    t, e = x.shape[0], w_gate.shape[0]
    s = sigmoid(x @ w_gate.T)  # [T, E]
    sel = s if expert_bias is None else s + expert_bias[None, :]  # [T, E]
    if capacity:
        ids_in = np.zeros(t, dtype=np.int64) if block_ids is None else np.asarray(block_ids)  # [T]
        allowed = block_pool(sel if pool_score == "biased" else s, ids_in, capacity)  # [T, E]
        sel = np.where(allowed, sel, -np.inf)  # [T, E]
    elif n_group > 1:
        per = e // n_group
        grouped = np.sort(sel.reshape(t, n_group, per), axis=-1)  # [T, G, E/G] ascending
        score = grouped[..., -min(2, per):].sum(axis=-1)  # [T, G] sum of the two best
        keep_g = np.argsort(-score, axis=-1, kind="stable")[:, :n_group_used]  # [T, g]
        keep = np.zeros((t, n_group), dtype=bool)  # [T, G]
        np.put_along_axis(keep, keep_g, True, axis=-1)
        sel = np.where(np.repeat(keep, per, axis=-1), sel, -np.inf)  # [T, E]
    ids = np.argsort(-sel, axis=-1, kind="stable")[:, :n_expert_used]  # [T, k]
    w = np.take_along_axis(s, ids, axis=-1)  # [T, k]
    if expert_norm:
        w = w / np.maximum(w.sum(axis=-1, keepdims=True), WEIGHT_SUM_FLOOR)  # [T, k]
    return Route(ids.astype(np.int64), w * np.asarray(expert_scale, dtype=w.dtype))


def routing_blocks(pos: np.ndarray, cfg: RefConfig) -> np.ndarray | None:
    """The routing block of each position (``pos // block_size``), or None without block routing."""
    if not cfg.expert_capacity:
        return None
    if cfg.pool_scope == "forward":
        return np.zeros(len(pos), dtype=np.int64)  # [S] one pool for the whole call (a leak, for tests)
    return np.asarray(pos, dtype=np.int64) // cfg.routing_block  # [S]


def moe(x: np.ndarray, wts: Weights, p: str, cfg: RefConfig,
        block_ids: np.ndarray | None = None) -> tuple[np.ndarray, Route]:
    """Routed experts (looping over experts, not tokens) plus the shared expert on the same input."""
    r = route(x, wts[p + "ffn_gate_inp.weight"], wts.get(p + "exp_probs_b.bias"),
              n_expert_used=cfg.n_expert_used, n_group=cfg.n_group, n_group_used=cfg.n_group_used,
              expert_norm=cfg.expert_norm, expert_scale=cfg.expert_scale, block_ids=block_ids,
              capacity=cfg.expert_capacity, pool_score=cfg.pool_score)
    gate, up, down = (wts[p + f"ffn_{n}_exps.weight"] for n in ("gate", "up", "down"))  # [E, I, H] x2, [E, H, I]
    y = np.zeros_like(x)  # [T, H]
    for ex in np.unique(r.ids):
        tok, slot = np.nonzero(r.ids == ex)  # [n], [n]; a token picks an expert at most once
        y[tok] += r.weights[tok, slot][:, None] * swiglu(x[tok], gate[ex], up[ex], down[ex])  # [n, H]
    if p + "ffn_gate_shexp.weight" in wts:
        y = y + swiglu(x, wts[p + "ffn_gate_shexp.weight"], wts[p + "ffn_up_shexp.weight"],
                       wts[p + "ffn_down_shexp.weight"])  # [T, H]
    return y, r


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """GQA attention; kv head g serves query heads [g*n_rep, (g+1)*n_rep). q [S,Hq,D], k/v [T,Hkv,D], mask [S,T]."""
    s, hq, d = q.shape
    hkv = k.shape[1]
    qg = q.reshape(s, hkv, hq // hkv, d)  # [S, Hkv, R, D]
    att = np.einsum("sgrd,tgd->grst", qg, k) / np.sqrt(np.asarray(d, dtype=q.dtype))  # [Hkv, R, S, T]
    p = softmax(att + mask.astype(q.dtype))  # [Hkv, R, S, T]
    o = np.einsum("grst,tgd->sgrd", p, v)  # [S, Hkv, R, D]
    return o.reshape(s, hq * d)  # [S, Hq*D]


def qkv_heads(a: np.ndarray, wts: Weights, p: str, cfg: RefConfig,
              pos: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fused QKV -> per-head qk-RMSNorm -> partial NeoX RoPE (spec §3.3)."""
    qkv = (a @ wts[p + "attn_qkv.weight"].T).reshape(a.shape[0], -1, cfg.head_dim)  # [S, Hq+2Hkv, D]
    q = qkv[:, :cfg.n_head]  # [S, Hq, D]
    k = qkv[:, cfg.n_head:cfg.n_head + cfg.n_head_kv]  # [S, Hkv, D]
    v = qkv[:, cfg.n_head + cfg.n_head_kv:]  # [S, Hkv, D]
    q = rms_norm(q, wts[p + "attn_q_norm.weight"], cfg.eps)  # [S, Hq, D]
    k = rms_norm(k, wts[p + "attn_k_norm.weight"], cfg.eps)  # [S, Hkv, D]
    q = rope_neox(q, pos, cfg.rope_dim, cfg.rope_theta)  # [S, Hq, D]
    k = rope_neox(k, pos, cfg.rope_dim, cfg.rope_theta)  # [S, Hkv, D]
    return q, k, v


class LayerOut(NamedTuple):
    h: np.ndarray  # [S, H] residual stream after the layer
    k: np.ndarray  # [S, Hkv, D] this call's keys (after qk-norm and RoPE)
    v: np.ndarray  # [S, Hkv, D] this call's values
    route: Route | None  # None for dense layers


def layer(h: np.ndarray, wts: Weights, i: int, cfg: RefConfig, pos: np.ndarray, mask: np.ndarray,
          past_k: np.ndarray, past_v: np.ndarray) -> LayerOut:
    """One pre-norm decoder layer attending over [past ‖ new] keys (spec §3.2)."""
    p = f"blk.{i}."
    a = rms_norm(h, wts[p + "attn_norm.weight"], cfg.eps)  # [S, H]
    q, k, v = qkv_heads(a, wts, p, cfg, pos)  # [S, Hq, D], [S, Hkv, D], [S, Hkv, D]
    o = attention(q, np.concatenate([past_k, k]), np.concatenate([past_v, v]), mask)  # [S, Hq*D]
    h = h + o @ wts[p + "attn_output.weight"].T  # [S, H]
    m = rms_norm(h, wts[p + "ffn_norm.weight"], cfg.eps)  # [S, H]
    if i < cfg.n_dense:
        ffn = swiglu(m, wts[p + "ffn_gate.weight"], wts[p + "ffn_up.weight"], wts[p + "ffn_down.weight"])  # [S, H]
        return LayerOut(h + ffn, k, v, None)
    ffn, r = moe(m, wts, p, cfg, routing_blocks(pos, cfg))  # [S, H]
    return LayerOut(h + ffn, k, v, r)


def forward(wts: Weights, cfg: RefConfig, ids: np.ndarray, pos: np.ndarray, mask: np.ndarray,
            past: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, list[LayerOut]]:
    """Logits [S, V] for ``ids`` at ``pos``; ``past[i]`` = cached (K, V) of layer i; mask [S, n_past + S].

    Logit row i predicts the token AT position i (no shift, spec §3.8). Also returns each layer's
    new K/V and routing so callers can commit to a cache or count experts.
    """
    h = wts["token_embd.weight"][ids]  # [S, H], no scaling
    outs = []
    for i in range(cfg.n_layer):
        out = layer(h, wts, i, cfg, pos, mask, *past[i])
        outs.append(out)
        h = out.h  # [S, H]
    h = rms_norm(h, wts["output_norm.weight"], cfg.eps)  # [S, H]
    return h @ wts["output.weight"].T, outs  # [S, V]


def expert_union(routes: Mapping[int, Route] | Sequence[Route | None]) -> dict[int, np.ndarray]:
    """Per MoE layer, the sorted distinct experts any token selected ("experts touched")."""
    items = routes.items() if isinstance(routes, Mapping) else enumerate(routes)
    return {i: np.unique(r.ids) for i, r in items if r is not None}
