"""On-CPU time per kernel group of a diffusion step or an AR token, from ``perf`` samples (issue 28).

Usage: .venv/bin/python benchmarks/kernel_cpu_time.py MODEL.gguf [--steps 20] [--ar] [--threads 2] [--block half-masks]
           [--env DLLM_MOE_ROWS=0 --env GOMP_SPINCOUNT=300000] [--variants 'A:ENV=V+ENV=V,B:...'] [--rounds 2]

Wall-clock step times on a shared machine swing 2x with other people's jobs; the CPU time a kernel spends is far
steadier (it still feels cache and memory contention). A child process loads the model, commits a 256-token prefix,
warms up, and runs ``--steps`` 32-token steps (all rows out) or AR tokens; ``perf record -F 1999`` samples it from the
first timed step on (``perf record --control``), and samples are grouped by symbol into kernels:

    moe q4_K / moe q6_K     the routed experts' GEMV kernels (per row, or patch 0009's multi-row ones)
    q4_K gemm / q6_K gemm   repacked dense GEMMs (attention, dense FFN, shared expert, output head)
    f32 attention matmuls   K·Q (patch 0014's rows kernel, or upstream's vec_dot) and the softmax times V (sgemm)
    binary ops              element-wise add / sub / mul / div (the MoE expert weighting among them)
    barrier spin            libgomp's spin-wait (symbol-less addresses in libgomp)
    other ggml / python     the rest of libggml-cpu; the interpreter

Figures are CPU milliseconds per step summed over the threads. ``--variants`` runs several environments
round-robin (A, B, A, B, ...) for ``--rounds`` rounds and prints one table.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

FREQ = 1999
GROUPS = [  # first match wins
    ("moe q4_K", r"q4_K_8x8_q8_K_rows|gemv_q4_K_8x8_q8_K"),
    ("moe q6_K", r"q6_K_8x8_rows|gemv_q6_K_8x8_q8_K"),
    ("q6_K gemm", r"q6_K_8x8_gemm|gemm_q6_K"),
    ("q4_K gemm", r"gemm_q4_K"),
    ("f32 attention matmuls", r"dllm_mul_mat_f32_rows|tinyBLAS|ggml_vec_dot_f32"),  # kq (patch 0014), kqv (sgemm)
    ("binary ops", r"binary_op|ggml_compute_forward_(add|add_non_quantized|sub|mul|div)$"),  # add / sub / mul / div (ggml-cpu/binary-ops.cpp; patch 0013)
]


def child(args: argparse.Namespace) -> None:
    import numpy as np

    from dllm_cli.runtime.model import Model
    from dllm_cli.runtime.options import RuntimeOptions
    from dllm_cli.runtime.session import Session

    opts = RuntimeOptions(threads=args.threads, ctx_size=320)
    model = Model(args.model, opts)
    s = Session(model, opts)
    rng = np.random.default_rng(0)
    B = model.block_length
    s.commit([int(t) for t in rng.integers(0, model.mask_id, size=256)], 0)
    if args.block == "half-masks":  # a decoding block as dllm bench and step_profile use: 16 tokens + 16 masks
        block = [int(t) for t in rng.integers(0, model.mask_id, size=B // 2)] + [model.mask_id] * (B - B // 2)
    else:
        block = [int(t) for t in rng.integers(0, model.mask_id, size=B)]
    if args.ar:
        s.set_causal(True)

    def one() -> None:
        if args.ar:
            s.step(block[:1], 256, [0])
        else:
            s.step(block, 256, list(range(B)))

    for _ in range(2):
        one()
    ctl = os.environ.get("PERF_CTL_FIFO")
    if ctl:
        Path(ctl).write_text("enable\n")
    t0 = time.perf_counter()
    for _ in range(args.steps):
        one()
    print(f"wall_ms {1e3 * (time.perf_counter() - t0) / args.steps:.2f}")


def profile(args: argparse.Namespace, env_extra: dict[str, str]) -> tuple[dict[str, float], float]:
    with tempfile.TemporaryDirectory() as d:
        fifo, data = Path(d) / "ctl", Path(d) / "perf.data"
        os.mkfifo(fifo)
        env = dict(os.environ, PERF_CTL_FIFO=str(fifo), **env_extra)
        cmd = ["perf", "record", "-q", "-F", str(FREQ), "-D", "-1", "--control", f"fifo:{fifo}", "-o", str(data),
               "--", sys.executable, __file__, str(args.model), "--child", "--steps", str(args.steps),
               "--threads", str(args.threads), "--block", args.block] + (["--ar"] if args.ar else [])
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
        if out.returncode:
            raise SystemExit(f"perf failed: {out.stderr[-2000:]}")
        wall = float(re.search(r"wall_ms ([\d.]+)", out.stdout).group(1))  # type: ignore[union-attr]
        rep = subprocess.run(["perf", "report", "-q", "-i", str(data), "--no-children", "--sort", "dso,sym",
                              "-F", "sample,dso,sym"], capture_output=True, text=True).stdout
    groups: dict[str, float] = defaultdict(float)
    for line in rep.splitlines():
        m = re.match(r"\s*(\d+)\s+(\S+)\s+\[.\]\s+(.*)", line)
        if not m:
            continue
        n, dso, sym = int(m.group(1)), m.group(2), m.group(3).strip()
        g = next((name for name, pat in GROUPS if re.search(pat, sym)), None)
        if g is None:
            g = ("barrier spin" if "libgomp" in dso else "other ggml" if "ggml" in dso
                 else "python" if "python" in dso else "other")
        groups[g] += 1e3 * n / FREQ / args.steps
    return dict(groups), wall


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", type=Path)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ar", action="store_true", help="AR tokens (causal, 1 row) instead of 32-token steps")
    ap.add_argument("--variants", default="default:", help="NAME:ENV=V+ENV=V,NAME:... (round-robin)")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--block", choices=("random", "half-masks"), default="random",
                    help="random: 32 random tokens (the most experts per step); half-masks: 16 random tokens + 16 masks")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    variants = []
    for v in args.variants.split(","):
        name, _, envs = v.partition(":")
        variants.append((name, dict(e.split("=", 1) for e in envs.split("+") if e)))
    results: dict[str, list[tuple[dict[str, float], float]]] = defaultdict(list)
    for r in range(args.rounds):
        for name, env in variants:
            g, wall = profile(args, env)
            results[name].append((g, wall))
            print(f"round {r} {name}: wall {wall:.1f} ms/step (load {os.getloadavg()[0]:.1f}); "
                  + ", ".join(f"{k} {v:.1f}" for k, v in sorted(g.items())), flush=True)
    keys = sorted({k for runs in results.values() for g, _ in runs for k in g})
    what = "AR token" if args.ar else "32-token step"
    print(f"\nCPU ms per {what} (sum over {args.threads} threads), mean of {args.rounds} round(s); {args.model.name}")
    print("| kernel | " + " | ".join(results) + " |")
    print("|---|" + "---|" * len(results))
    for k in keys + ["total CPU", "wall ms"]:
        cells = []
        for runs in results.values():
            if k == "wall ms":
                v = sum(w for _, w in runs) / len(runs)
            elif k == "total CPU":
                v = sum(sum(g.values()) for g, _ in runs) / len(runs)
            else:
                v = sum(g.get(k, 0.0) for g, _ in runs) / len(runs)
            cells.append(f"{v:.1f}")
        print(f"| {k} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
