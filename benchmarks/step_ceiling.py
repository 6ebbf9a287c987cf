"""How fast a diffusion step must be for issue 17's goal, against the compute the machine has (issue 17).

Usage: .venv/bin/python benchmarks/step_ceiling.py MODEL.gguf --layers 20 --ar-ms 18.8 --peak 258 --peak 238
       [--cores 2 --ghz 3.06 --int8-macs 64] [--rows 32 --prefix 256 --union 43]

MODEL gives the shapes (a mini-shaped synthetic file, any depth); ``--layers`` sets the depth to cost. The step's
FLOPs come from ``dllm_cli.bench.roofline.forward_cost`` (32 tokens after a ``--prefix`` KV prefix, ``--rows``
logits rows, ``--union`` distinct experts per MoE layer). The goal (issue 17): diffusion tokens/s at the paper's TPF
(speed 5.34 / quality 3.12) ≥ 1.0× / 0.6× the AR tokens/s of the same weights, i.e. a step no slower than
``TPF / ratio × AR token``. The script prints the compute rate each goal needs and, for every ``--peak`` (measured
GFLOP/s of ggml's own quantized GEMM at 32 rows) and the CPU's theoretical int8 multiply-add peak (cores × GHz ×
``--int8-macs`` per cycle × 2), the fastest step that peak allows and the ratio it would give.
"""
from __future__ import annotations

import argparse
import dataclasses

from dllm_cli.bench.roofline import Shapes, forward_cost

GOALS = {"speed": (5.34, 1.0), "quality": (3.12, 0.6)}  # paper TPF, required diffusion / AR ratio


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--layers", type=int, default=20)
    ap.add_argument("--ar-ms", type=float, required=True, help="measured (or fitted) AR token time, ms")
    ap.add_argument("--peak", type=float, action="append", default=[], help="measured GEMM GFLOP/s (repeatable)")
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--ghz", type=float, default=3.06)
    ap.add_argument("--int8-macs", type=int, default=64, help="int8 multiply-adds per cycle per core "
                    "(Zen 4: two 256-bit VPDPBUSD per cycle = 64)")
    ap.add_argument("--rows", type=float, default=32)
    ap.add_argument("--prefix", type=float, default=256)
    ap.add_argument("--union", type=float, default=43)
    args = ap.parse_args()
    shapes = dataclasses.replace(Shapes.from_gguf(args.model), layers=args.layers)
    gflop = forward_cost(shapes, 32, args.prefix, args.rows, args.union).flops / 1e9
    print(f"L{args.layers}: one 32-token step = {gflop:.1f} GFLOP ({args.rows:g} rows out, {args.union:g} experts "
          f"per MoE layer); AR token {args.ar_ms:.1f} ms")
    for mode, (tpf, ratio) in GOALS.items():
        budget = tpf / ratio * args.ar_ms
        print(f"goal {mode}: step <= {budget:.0f} ms -> needs {gflop / budget * 1e3:.0f} GFLOP/s")
    theory = args.cores * args.ghz * args.int8_macs * 2
    print("| peak | GFLOP/s | fastest step ms | speed ratio @5.34 | quality ratio @3.12 |")
    print("|---|---|---|---|---|")
    for name, peak in [*((f"measured {p:g}", p) for p in args.peak), ("theoretical int8", theory)]:
        step = gflop / peak * 1e3
        print(f"| {name} | {peak:.0f} | {step:.0f} | {5.34 * args.ar_ms / step:.2f}x | "
              f"{3.12 * args.ar_ms / step:.2f}x |")


if __name__ == "__main__":
    main()
