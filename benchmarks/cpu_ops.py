"""CPU time of the single ops patches 0014 and 0015 change, on the installed runtime's ggml-cpu (issue 28).

Usage: .venv/bin/python benchmarks/cpu_ops.py [--reps 300] [--lib DIR]
Compare with upstream's loops in the same build: DLLM_F32_ROWS=0 (K·Q) and DLLM_ROW_OPS=0 (softmax, top_k).

Ops, at the mini models' shapes:
    kq        K [128, 288, 4] (f32 KV cache, 4 KV heads) times the permuted view of Q [128, 16, 32]: one layer's
              K·Q for a 32-token block at a 256-token prefix
    softmax   the confidence head's softmax over [157184, 32] logits
    top_k     its top_k(3) over the same logits

Each op is computed ``--reps`` times on 1 thread; the figure is CPU milliseconds (``time.thread_time``), min and
median. ``--lib`` takes another runtime's ``lib/`` directory (e.g. one built without a patch).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from ggml_ctypes import Ggml, Graph, _InitParams  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=300)
    ap.add_argument("--lib", type=Path, help="a runtime's lib/ directory (default: the installed one)")
    args = ap.parse_args()
    if args.lib is not None and not list(args.lib.glob("libggml-base.so*")):
        sys.exit(f"error: {args.lib} holds no libggml-base.so: give a runtime's lib/ directory")
    g = Ggml(args.lib)
    ctx = g.base.ggml_init(_InitParams(512 << 20, None, False))
    G = Graph(g.base, ctx)
    rng = np.random.default_rng(0)
    k = G.tensor(rng.standard_normal((4, 288, 128)).astype(np.float32))
    q = G.tensor(rng.standard_normal((32, 16, 128)).astype(np.float32))
    logits = G.tensor((rng.standard_normal((32, 157184)) * 4).astype(np.float32))
    ops = {"kq [128x288x4] . permuted Q [128x16x32]": G.op("mul_mat", k, G.op("permute", q, 0, 2, 1, 3)),
           "softmax [157184 x 32]": G.op("soft_max", logits),
           "top_k(3) [157184 x 32]": G.op("top_k", logits, 3)}
    for name, node in ops.items():
        gf = g.base.ggml_new_graph(ctx)
        g.base.ggml_build_forward_expand(gf, node)
        times = []
        for _ in range(args.reps):
            t0 = time.thread_time()
            g.cpu.ggml_graph_compute_with_ctx(ctx, gf, 1)
            times.append(time.thread_time() - t0)
        print(f"{name}: CPU ms (1 thread) min {1e3 * min(times):.3f} median {1e3 * float(np.median(times)):.3f}")
    g.base.ggml_free(ctx)


if __name__ == "__main__":
    main()
