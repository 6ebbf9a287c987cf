"""The machine's limit: FLOPs and bytes of one forward from the model's shapes, against measured peaks.

Costs count the matmuls (2 FLOPs per multiply-add), attention over the cached prefix, and the bytes of every
weight a forward must read: all dense tensors, the output head, and for each MoE layer only the experts in
the measured union (bytes from the file's actual tensor types). Peaks come from probes: a numpy/BLAS
f32 matmul (all cores), a large array copy (read + write bytes), and STREAM-style read and triad passes on the
runtime's threads; the read bandwidth is the memory limit (weights are streamed, not written).
"""
from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dllm_cli import gguf_keys as K


@dataclass(frozen=True)
class Shapes:
    hidden: int
    layers: int
    dense_layers: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    moe_ffn: int
    experts: int
    experts_used: int
    vocab: int
    params: int
    dense_bytes: int  # every weight read in full per forward (attention, dense FFN, router, shared, output)
    expert_bytes_per_layer: int  # all routed experts of one MoE layer (gate+up+down)
    embd_row_bytes: int

    @classmethod
    def from_gguf(cls, path: str | Path) -> "Shapes":
        import gguf

        r = gguf.GGUFReader(str(path), "r")

        def u(key: str, default: int = 0) -> int:
            f = r.get_field(key)
            return int(f.contents()) if f is not None else default

        dense = experts = embd = params = 0
        n_moe = 0
        vocab = 0
        for t in r.tensors:
            params += int(t.n_elements)
            if t.name == "token_embd.weight":
                vocab = int(t.shape[-1])
                embd = int(t.n_bytes) // max(vocab, 1)
            elif "_exps." in t.name:
                experts += int(t.n_bytes)
                n_moe += t.name.endswith("ffn_gate_exps.weight")
            else:
                dense += int(t.n_bytes)
        layers = u(K.BLOCK_COUNT)
        hidden = u(K.EMBEDDING_LENGTH)
        heads = u(K.HEAD_COUNT)
        return cls(hidden=hidden, layers=layers, dense_layers=u(K.LEADING_DENSE), heads=heads,
                   kv_heads=u(K.HEAD_COUNT_KV), head_dim=u(K.KEY_LENGTH, hidden // max(heads, 1)),
                   ffn=u(K.FEED_FORWARD_LENGTH), moe_ffn=u(K.EXPERT_FFN), experts=u(K.EXPERT_COUNT),
                   experts_used=u(K.EXPERT_USED), vocab=vocab, params=params, dense_bytes=dense,
                   expert_bytes_per_layer=experts // max(n_moe, 1), embd_row_bytes=embd)


@dataclass(frozen=True)
class Cost:
    flops: float
    bytes: float

    def seconds(self, peak_flops: float, bandwidth: float) -> float:
        """Roofline time: the slower of compute and memory traffic."""
        return max(self.flops / peak_flops, self.bytes / bandwidth)


def forward_cost(s: Shapes, n_tokens: int, n_prefix: float, n_rows: float, union: float,
                 kv_bytes: int = 2) -> Cost:
    """One decode of ``n_tokens`` against ``n_prefix`` cached positions, ``n_rows`` logits rows, ``union``
    distinct routed experts per MoE layer."""
    H, D, n = s.hidden, s.head_dim, n_tokens
    moe = s.layers - s.dense_layers
    attn: float = 2 * n * H * (s.heads + 2 * s.kv_heads) * D + 2 * n * s.heads * D * H  # qkv + output proj
    attn += 4 * n * (n_prefix + n) * s.heads * D  # scores + weighted values
    flops: float = s.layers * attn
    flops += s.dense_layers * 6 * n * H * s.ffn
    flops += moe * (2 * n * H * s.experts + 6 * n * H * s.moe_ffn * (s.experts_used + 1))  # router, routed, shared
    flops += 2 * n_rows * H * s.vocab
    kv = s.layers * 2 * (n_prefix + n) * s.kv_heads * D * kv_bytes
    weights = s.dense_bytes + moe * s.expert_bytes_per_layer * min(union, s.experts) / max(s.experts, 1)
    return Cost(float(flops), float(weights + kv + n * s.embd_row_bytes))


def _read_gbs(threads: int, mib: int) -> float:
    """STREAM-style read bandwidth in GB/s: ``threads`` threads each scan their own slice of one byte array with
    ``count_nonzero`` (a SIMD scan that is bound by memory, not by arithmetic as a float sum is); best of several
    passes."""
    from concurrent.futures import ThreadPoolExecutor

    a = np.ones(mib * (1 << 20), np.uint8)
    parts = np.array_split(a, threads)
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(np.count_nonzero, parts))
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            list(pool.map(np.count_nonzero, parts))
            best = min(best, time.perf_counter() - t0)
    return a.nbytes / best / 1e9


def _triad_gbs(threads: int, mib: int) -> float:
    """STREAM triad ``a = b + s * c`` in GB/s (2 reads + 1 write counted; numpy needs two passes over ``a`` for it,
    so this is a lower bound); ``threads`` threads on their own slices, best of several passes."""
    from concurrent.futures import ThreadPoolExecutor

    n = mib * (1 << 20) // 8 // 3
    a, b, c = np.empty(n), np.ones(n), np.ones(n)
    sl = [slice(int(i * n / threads), int((i + 1) * n / threads)) for i in range(threads)]

    def triad(k: slice) -> None:
        np.multiply(c[k], 3.0, out=a[k])
        np.add(a[k], b[k], out=a[k])

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(triad, sl))
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            list(pool.map(triad, sl))
            best = min(best, time.perf_counter() - t0)
    return 3 * a.nbytes / best / 1e9


def probe_machine(threads: int | None = None, size: int = 2048, copy_mib: int = 512) -> dict[str, float | str]:
    """Measured peaks: f32 matmul GFLOP/s (numpy BLAS), copy bandwidth GB/s (read + write), and the STREAM-style
    read and triad bandwidths on ``threads`` threads (default: the runtime's default thread count). The read
    bandwidth is the roofline's memory limit: a forward streams its weights, it does not write them."""
    from dllm_cli.runtime.threads import default_threads

    nthreads = threads or default_threads()
    rng = np.random.default_rng(0)
    a = rng.standard_normal((size, size), dtype=np.float32)
    b = rng.standard_normal((size, size), dtype=np.float32)
    a @ b
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    gflops = 2 * size ** 3 / best / 1e9
    n = copy_mib * (1 << 20) // 8
    src = np.ones(n, np.float64)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    bestc = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        bestc = min(bestc, time.perf_counter() - t0)
    del src, dst
    return {"matmul_gflops": round(gflops, 2), "bandwidth_gbs": round(2 * n * 8 / bestc / 1e9, 2),
            "read_gbs": round(_read_gbs(nthreads, copy_mib), 2), "triad_gbs": round(_triad_gbs(nthreads, copy_mib), 2),
            "matmul_probe": f"numpy f32 {size}x{size} matmul", "copy_probe": f"{copy_mib} MiB copy (read+write)",
            "read_probe": f"{copy_mib} MiB scanned by {nthreads} threads (STREAM-style read)"}


def memory_limit_gbs(machine: Mapping[str, Any]) -> float:
    """The bandwidth a forward's weight stream is held to: the read probe (older documents: the copy probe)."""
    return float(machine.get("read_gbs") or machine["bandwidth_gbs"])


def moe_floor(s: Shapes, union: float, machine: Mapping[str, Any]) -> dict[str, Any] | None:
    """One MoE layer's routed-expert bytes when ``union`` distinct experts are touched, and the time the machine's
    read bandwidth allows for them (issue 28's floor): ``{"experts", "mbytes" (MB), "floor_ms"}``; None for a model
    without MoE layers."""
    if s.layers <= s.dense_layers or not s.experts:
        return None
    nbytes = s.expert_bytes_per_layer * min(union, s.experts) / s.experts
    return {"experts": round(union, 2), "mbytes": sig(nbytes / 1e6),
            "floor_ms": sig(1e3 * nbytes / (memory_limit_gbs(machine) * 1e9))}


def sig(x: float, digits: int = 4) -> float:
    """``x`` to ``digits`` significant digits (bench figures span tiny test models to 100B ones)."""
    return float(f"{x:.{digits}g}")


def roofline_pct(cost: Cost, measured_s: float, machine: Mapping[str, Any],
                 layers: int = 0) -> dict[str, float | str | None]:
    """What the roofline allows for ``cost`` and how close the measured time gets (100% = at the limit), with the
    achieved rates: bytes and FLOPs per second, each as a fraction (%) of the measured machine limit (read
    bandwidth, matmul peak), and bytes read per layer when ``layers`` is given."""
    bw = memory_limit_gbs(machine) * 1e9
    peak = machine["matmul_gflops"] * 1e9
    t = cost.seconds(peak, bw)
    bound = "memory" if cost.bytes / bw >= cost.flops / peak else "compute"
    ok = measured_s > 0
    gbs = cost.bytes / measured_s / 1e9 if ok else None
    gfl = cost.flops / measured_s / 1e9 if ok else None
    return {"gflop": sig(cost.flops / 1e9), "gbytes": sig(cost.bytes / 1e9), "roofline_s": sig(t),
            "bound": bound, "pct_of_roofline": round(100 * t / measured_s, 1) if ok else None,
            "mbytes_per_layer": sig(cost.bytes / 1e6 / layers) if layers else None,
            "achieved_gbs": sig(gbs) if gbs is not None else None,
            "pct_of_bandwidth": sig(100 * gbs * 1e9 / bw) if gbs is not None else None,
            "achieved_gflops": sig(gfl) if gfl is not None else None,
            "pct_of_matmul_peak": sig(100 * gfl * 1e9 / peak) if gfl is not None else None}
