"""CPU time of the single ops and kernels patches 0014-0017 change, on the installed runtime's ggml-cpu (issue 28).

Usage: .venv/bin/python benchmarks/cpu_ops.py [--reps 300] [--lib DIR] [--kernels]
Compare with upstream's loops in the same build: DLLM_F32_ROWS=0 (K·Q) and DLLM_ROW_OPS=0 (softmax, top_k).

Ops, at the mini models' shapes:
    kq        K [128, 288, 4] (f32 KV cache, 4 KV heads) times the permuted view of Q [128, 16, 32]: one layer's
              K·Q for a 32-token block at a 256-token prefix
    softmax   the confidence head's softmax over [157184, 32] logits
    top_k     its top_k(3) over the same logits

``--kernels`` times the repacked matmul kernels instead, called directly on random blocks (AVX-512 VNNI builds):
    q4_K gemm     32 rows by 2048 x 3072 (the mini wqkv), upstream's ggml_gemm_q4_K_8x8_q8_K and 0016's VNNI kernel
    q6_K gemm     32 rows by 2048 x 16384 (a slice of the output head), 0007's kernel or 0017's (DLLM_Q6K_GEMM=0
                  selects 0007's: run twice)
    q6_K rows     8 scattered rows by 512 x 2048 (a Q6_K expert's down projection), 0009 or 0017 likewise

Each op is computed ``--reps`` times on 1 thread; the figure is CPU milliseconds (``time.thread_time``), min and
median. ``--lib`` takes another runtime's ``lib/`` directory (e.g. one built without a patch).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from ggml_ctypes import Ggml, Graph, _InitParams  # noqa: E402
import repack_kernels as rk  # noqa: E402


def _report(name: str, times: list[float]) -> None:
    print(f"{name}: CPU ms (1 thread) min {1e3 * min(times):.3f} median {1e3 * float(np.median(times)):.3f}")


def _time(fn, reps: int) -> list[float]:
    times = []
    for _ in range(reps):
        t0 = time.thread_time()
        fn()
        times.append(time.thread_time() - t0)
    return times


def kernels(lib: Path | None, reps: int) -> None:
    """Time the repacked Q4_K / Q6_K kernels (see the module doc)."""
    try:
        cpu = rk.load_cpu(lib)
    except AttributeError as e:  # a VNNI build without the kernels: one from before patches 0016 / 0017
        sys.exit(f"error: this runtime lacks a kernel to time ({str(e).split(': ')[-1].split('.')[0]}): "
                 "give a runtime built with patches 0016 and 0017")
    if cpu is None:
        sys.exit("error: this runtime was built without AVX-512 VNNI: it has no 0016 / 0017 kernels to time")
    rng = np.random.default_rng(0)
    q6 = "0007/0009 (DLLM_Q6K_GEMM=0)" if os.environ.get("DLLM_Q6K_GEMM") == "0" else "0017"
    n, nc, nr = 2048, 3072, 32
    w, a = rk.weights(rng, nc, n // rk.QK_K), rk.activations(cpu, rk.floats(rng, n, nr))
    for name, label in (("ggml_gemm_q4_K_8x8_q8_K", "upstream"), ("ggml_gemm_q4_K_8x8_q8_K_vnni", "0016")):
        run, _ = rk.gemm_call(cpu, name, n, w, a, nr, nc)
        _report(f"q4_K gemm {nr} x {n} x {nc} [{label}]", _time(run, reps))
    nc = 16384
    w = rk.weights(rng, nc, n // rk.QK_K, rk.Q6_KX8, 8)
    run, _ = rk.gemm_call(cpu, "ggml_gemm_q6_K_8x8_q8_K", n, w, a, nr, nc)
    _report(f"q6_K gemm {nr} x {n} x {nc} [{q6}]", _time(run, reps))
    n, nc = 512, 2048
    w, q = rk.weights(rng, nc, n // rk.QK_K, rk.Q6_KX8, 8), rk.rows_q8_k(cpu, rk.floats(rng, n, 8))
    run, _ = rk.gemv_rows_call(cpu, "ggml_gemv_q6_K_8x8_q8_K_rows", n, w, q, nc)
    _report(f"q6_K rows 8 x {n} x {nc} [{q6}]", _time(run, reps))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=300, help="timed runs of each op (at least 1)")
    ap.add_argument("--lib", type=Path, help="a runtime's lib/ directory (default: the installed one)")
    ap.add_argument("--kernels", action="store_true", help="time the repacked Q4_K / Q6_K kernels instead")
    args = ap.parse_args()
    if args.reps < 1:
        ap.error(f"--reps must be at least 1, got {args.reps}")
    for name in ("libggml-base", "libggml-cpu"):
        if args.lib is not None and not list(args.lib.glob(f"{name}.so*")):
            sys.exit(f"error: {args.lib} holds no {name}.so: give a runtime's lib/ directory")
    try:
        g = Ggml(args.lib)
    except OSError as e:
        sys.exit(f"error: cannot load the runtime's ggml ({e}): give a runtime's lib/ directory")
    if args.kernels:
        kernels(args.lib, args.reps)
        return
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
        _report(name, _time(lambda: g.cpu.ggml_graph_compute_with_ctx(ctx, gf, 1), args.reps))
    g.base.ggml_free(ctx)


if __name__ == "__main__":
    main()
