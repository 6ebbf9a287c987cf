"""Where one 32-token diffusion step spends its time, per op group (issue 17).

Usage: .venv/bin/python benchmarks/step_profile.py MODEL.gguf [--prefix 256] [--reps 5] [--threads 2] [--rows 32]
           [--block half-masks|distinct] [--names]

The last line compares the routed-expert time per MoE layer with its bandwidth floor: the bytes of the experts the
block routed to (read from llama.cpp) over the read bandwidth measured on the same threads.

Two contexts over the same model. The plain one times the step as decoding runs it (all rows out, through the
confidence head). The probed one installs a ggml scheduler eval callback that asks for every node, so ggml
computes the graph node by node and the callback sees each node finish: the time between two callbacks is that
node's. Nodes are grouped by their graph names (llama.cpp's ``cb(cur, name, il)``) and op:

    attention projections   wqkv / attn_output matmuls (+ q/k norms, RoPE)
    routed experts          MUL_MAT_ID, the router (ffn_moe_logits, probs, top-k, weights) and the weighted sum
    shared expert           *_shexp
    dense FFN               layer-0 ffn_gate/up/down (first_k_dense_replace)
    attention               kq, softmax, kqv (or flash_attn_ext)
    output head             result_output (the output matmul)
    confidence head         our patch's top-k / softmax / get_rows on the output
    other                   norms, adds, copies, the input embedding

Node-by-node compute adds a thread-pool barrier per node, so the probed total exceeds the plain step; the
difference is reported as the scheduler cost of splitting, and the shares are of the probed total. "graph and
scheduler overhead" of the plain step is estimated as plain step - sum of the probed op times of the big ops is
NOT attempted: the report gives the plain step, the probed sum and each group's share.
"""
from __future__ import annotations

import argparse
import ctypes
import re
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from dllm_cli.bench.experts import ExpertProbe
from dllm_cli.bench.roofline import Shapes, memory_limit_gbs, moe_floor, probe_machine
from dllm_cli.runtime.model import Model
from dllm_cli.runtime.options import RuntimeOptions
from dllm_cli.runtime.session import Session

GROUPS = [  # first match wins: (group, name regex, op names or None)
    ("output head", r"^result_output", None),
    ("confidence head", r"^(dllm_|conf)", None),
    ("routed experts", r"^ffn_moe_", None),
    ("shared expert", r"_shexp", None),
    ("attention projections", r"^(wqkv|Qcur|Kcur|Vcur|attn_out|attn_output|kqv_out|q_norm|k_norm|Qcur_normed|Kcur_normed)", None),
    ("attention", r"^(kq|kqv|kq_soft_max|fattn|__fattn__|attn_)", None),
    ("dense FFN", r"^ffn_(gate|up|down|out|swiglu|silu|par)", None),
]


class NodeTimer:
    """A ``ggml_backend_sched_eval_callback`` asking for every node and timing the gap between answers."""

    def __init__(self, rt) -> None:
        names = sorted((rt.path / "lib").glob("libggml-base.so*"))
        g = ctypes.CDLL(str(names[0])) if names else rt.cdll
        g.ggml_get_name.restype, g.ggml_get_name.argtypes = ctypes.c_char_p, [ctypes.c_void_p]
        g.ggml_op_desc.restype, g.ggml_op_desc.argtypes = ctypes.c_char_p, [ctypes.c_void_p]
        self.g = g
        self.times: dict[tuple[str, str], float] = defaultdict(float)
        self.last = 0.0
        self.callback = rt.lib.ggml_backend_sched_eval_callback(self._cb)

    def _cb(self, t: int, ask: bool, _user) -> bool:
        if ask:
            return True
        now = time.perf_counter()
        name = (self.g.ggml_get_name(t) or b"").decode(errors="replace")
        op = (self.g.ggml_op_desc(t) or b"").decode(errors="replace")
        self.times[(re.sub(r"-\d+$", "", name), op)] += now - self.last
        self.last = time.perf_counter()
        return True

    def start(self) -> None:
        self.last = time.perf_counter()


def group_of(name: str, op: str) -> str:
    if op == "MUL_MAT_ID":
        return "routed experts"
    for group, pattern, _ in GROUPS:
        if re.search(pattern, name):
            return group
    if op in ("SOFT_MAX", "FLASH_ATTN_EXT"):
        return "attention"
    return "other"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", type=Path)
    ap.add_argument("--prefix", type=int, default=256)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", type=int, default=32, help="output rows per step (32: T2T needs every row)")
    ap.add_argument("--names", action="store_true", help="also print the top node names")
    ap.add_argument("--block", choices=("half-masks", "distinct"), default="half-masks",
                    help="half-masks: 16 random tokens + 16 masks (a decoding block, as dllm bench); distinct: 32 "
                    "distinct random tokens (the most experts per step, issue 28's shape)")
    args = ap.parse_args()
    opts = RuntimeOptions(threads=args.threads, ctx_size=args.prefix + 64, ubatch=512)
    model = Model(args.model, opts)
    timer = NodeTimer(model.rt)
    plain, probed = Session(model, opts), Session(model, opts, eval_callback=timer.callback)
    B = model.block_length
    rng = np.random.default_rng(0)
    prefix = [int(t) for t in rng.integers(0, model.mask_id, size=args.prefix)]
    if args.block == "distinct":
        block = [int(t) for t in rng.choice(model.mask_id, size=B, replace=False)]
    else:
        block = [int(t) for t in rng.integers(0, model.mask_id, size=B // 2)] + [model.mask_id] * (B - B // 2)
    rows = list(range(B - args.rows, B))
    for s in (plain, probed):
        if prefix:
            s.commit(prefix, 0)
    plain_ms, probed_ms = [], []
    for r in range(args.reps + 1):
        t0 = time.perf_counter()
        plain.step(block, args.prefix, rows)
        t1 = time.perf_counter()
        if r:
            timer.start()
        probed.step(block, args.prefix, rows)
        t2 = time.perf_counter()
        if r:  # the first rep warms both up
            plain_ms.append(1e3 * (t1 - t0))
            probed_ms.append(1e3 * (t2 - t1))
        else:
            timer.times.clear()
    groups: dict[str, float] = defaultdict(float)
    for (name, op), sec in timer.times.items():
        groups[group_of(name, op)] += sec
    total = sum(groups.values())
    n = args.reps
    print(f"model {args.model.name}, prefix {args.prefix}, {args.rows} output rows, {args.threads} threads, "
          f"{n} reps")
    print(f"plain step: median {np.median(plain_ms):.1f} ms; probed step (node by node): median "
          f"{np.median(probed_ms):.1f} ms, node sum {1e3 * total / n:.1f} ms")
    print("| group | ms per step | share |")
    print("|---|---|---|")
    for g, sec in sorted(groups.items(), key=lambda kv: -kv[1]):
        print(f"| {g} | {1e3 * sec / n:.1f} | {100 * sec / total:.1f} % |")
    if args.names:
        for (name, op), sec in sorted(timer.times.items(), key=lambda kv: -kv[1])[:40]:
            print(f"  {1e3 * sec / n:8.2f} ms  {op:14s} {name}  -> {group_of(name, op)}")
    report_moe_floor(model, opts, prefix, block, rows, 1e3 * groups["routed experts"] / n, args.threads)
    plain.close()
    probed.close()
    model.close()


def report_moe_floor(model: Model, opts: RuntimeOptions, prefix: list[int], block: list[int], rows: list[int],
                     routed_ms: float, threads: int) -> None:
    """Per MoE layer: the profiled routed-expert time against the bandwidth floor, i.e. the bytes of the experts
    this block really routed to (read from llama.cpp) over the machine's measured read bandwidth (issue 28)."""
    sh = Shapes.from_gguf(model.path)
    n_moe = sh.layers - sh.dense_layers
    if n_moe <= 0 or not sh.experts:
        return
    probe = ExpertProbe(model.rt)
    s = Session(model, opts, eval_callback=probe.callback)
    try:
        if prefix:
            s.commit(prefix, 0)
        s.step(block, len(prefix), rows)
    finally:
        s.close()
    machine = probe_machine(threads)
    f = moe_floor(sh, float(np.mean(list(probe.union_sizes().values()))), machine)
    assert f is not None
    per_layer = routed_ms / n_moe
    print(f"MoE layer: {per_layer:.2f} ms ({n_moe} MoE layers); experts touched {f['experts']:.1f} of {sh.experts}, "
          f"{f['mbytes']:.1f} MB; read bandwidth {memory_limit_gbs(machine):.1f} GB/s ({machine['read_probe']}); "
          f"floor {f['floor_ms']:.2f} ms; {per_layer / f['floor_ms']:.2f}x the floor")


if __name__ == "__main__":
    main()
