"""Block routing (LLaDA2.2) against per-token routing on the same weights: experts touched, routed-expert bytes and
time per diffusion step.

    python benchmarks/block_routing.py --per-token A.gguf --block B.gguf [--prefix 256] [--reps 5]

A and B must hold the same tensors (``dllm bench --synthetic llada2-mini`` and ``--synthetic llada2.2-mini`` with
the same ``--layers``/``--quant`` do: same seed, only the block-routing keys differ). For each model: commit a
``--prefix``-token prompt, then time steps of one 32-token block (interleaved A/B, median of ``--reps``) for two
blocks: 32 distinct filler tokens, and 4 prompt tokens + 28 masks (a fresh decoding block). Experts touched = distinct
routed experts over the block per MoE layer, read from llama.cpp (``ffn_moe_topk``); routed bytes = that count times
one expert's bytes (gate+up+down) per MoE layer.
"""
from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace

import numpy as np

from dllm_cli.bench.experts import ExpertProbe
from dllm_cli.bench.roofline import Shapes
from dllm_cli.runtime import options
from dllm_cli.runtime.model import Model
from dllm_cli.runtime.session import Session


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--per-token", required=True)
    ap.add_argument("--block", required=True)
    ap.add_argument("--prefix", type=int, default=256)
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args()
    opts = replace(options.EXACT, ctx_size=1024, ubatch=512, threads=2)
    rng = np.random.default_rng(0)
    out = {}
    models = {"per-token": Model(a.per_token, opts), "block": Model(a.block, opts)}
    mask = models["block"].mask_id
    prompt = [int(t) for t in rng.integers(1000, 100000, size=a.prefix)]
    blocks = {"filler": [int(t) for t in rng.integers(1000, 100000, size=32)],
              "masks": [int(t) for t in rng.integers(1000, 100000, size=4)] + [mask] * 28}
    sessions, probes = {}, {}
    for name, m in models.items():
        probes[name] = ExpertProbe(m.rt)
        sessions[name] = Session(m, opts)
        sessions[name].commit(prompt, 0)
    for kind, blk in blocks.items():
        times: dict[str, list[float]] = {n: [] for n in models}
        for _ in range(a.reps):
            for name, s in sessions.items():
                t0 = time.perf_counter()
                s.step(blk, a.prefix, range(32))
                times[name].append(time.perf_counter() - t0)
        for name, m in models.items():
            shapes = Shapes.from_gguf(m.path)
            with Session(m, opts, eval_callback=probes[name].callback) as ps:
                ps.commit(prompt, 0)
                probes[name].clear()
                ps.step(blk, a.prefix, range(32))
            sizes = probes[name].union_sizes()
            union = statistics.mean(sizes.values())
            per_expert = shapes.expert_bytes_per_layer / shapes.experts
            out[(kind, name)] = (union, max(sizes.values()), union * per_expert * len(sizes),
                                 statistics.median(times[name]), len(sizes), per_expert)
    print(f"prefix {a.prefix}, 32-token block, 2 threads, median of {a.reps} interleaved steps")
    print("| block | routing | experts touched / MoE layer (mean, max) | routed-expert MiB / step | step ms |")
    print("|---|---|---|---|---|")
    for (kind, name), (u, mx, byt, t, n_moe, per) in out.items():
        print(f"| {kind} | {name} | {u:.1f}, {mx} of 256 | {byt / 2**20:.1f} ({n_moe} MoE layer(s)) | {t * 1e3:.0f} |")
    per = next(iter(out.values()))[5]
    print(f"one routed expert = {per / 2**20:.2f} MiB per MoE layer")
    for s in sessions.values():
        s.close()
    for m in models.values():
        m.close()


if __name__ == "__main__":
    main()
