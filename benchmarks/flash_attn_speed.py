"""Step time of each runtime configuration (KV type x flash attention) at several KV prefix lengths.

Usage: .venv/bin/python benchmarks/flash_attn_speed.py MODEL.gguf [--prefix 0,256,1024,4096] [--reps 7] [--threads 2]
One context per configuration over the same model; for each prefix every context commits the same random prefix,
then the 32-token step (all rows out, through the confidence head as decoding does) is timed round-robin across
the configurations, so load from other processes hits all of them alike. Prints the median ms per step.
The mini-shaped file comes from `dllm bench --synthetic llada2-mini --layers 2 --quant q4_k_m`.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from dllm_cli.runtime.model import Model
from dllm_cli.runtime.options import RuntimeOptions
from dllm_cli.runtime.session import Session

CONFIGS = {"f32 KV, FA on": ("f32", True), "f32 KV, FA off": ("f32", False),
           "f16 KV, FA on": ("f16", True), "f16 KV, FA off": ("f16", False)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", type=Path)
    ap.add_argument("--prefix", default="0,256,1024,4096")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    prefixes = [int(p) for p in args.prefix.split(",")]
    ctx = max(prefixes) + 64
    base = RuntimeOptions(threads=args.threads, ctx_size=ctx, ubatch=512)
    model = Model(args.model, base)
    sessions = {name: Session(model, RuntimeOptions(threads=args.threads, ctx_size=ctx, ubatch=512, kv_type=kv,
                                                    flash_attn=fa)) for name, (kv, fa) in CONFIGS.items()}
    rng = np.random.default_rng(0)
    B = model.block_length
    print(f"| prefix | {' | '.join(CONFIGS)} |")
    print("|---" * (len(CONFIGS) + 1) + "|")
    for prefix in prefixes:
        ids = [int(t) for t in rng.integers(0, model.mask_id, size=prefix)]
        block = [int(t) for t in rng.integers(0, model.mask_id, size=B // 2)] + [model.mask_id] * (B // 2)
        for s in sessions.values():
            s.reset()
            if prefix:
                s.commit(ids, 0)
            s.step(block, prefix, range(B))  # warm-up: a new graph shape
        times: dict[str, list[float]] = {name: [] for name in CONFIGS}
        for _ in range(args.reps):
            for name, s in sessions.items():
                t0 = time.perf_counter()
                s.step(block, prefix, range(B))
                times[name].append(time.perf_counter() - t0)
        print(f"| {prefix} | " + " | ".join(f"{1e3 * float(np.median(times[n])):.0f} ms" for n in CONFIGS) + " |",
              flush=True)
    for s in sessions.values():
        s.close()
    model.close()


if __name__ == "__main__":
    main()
