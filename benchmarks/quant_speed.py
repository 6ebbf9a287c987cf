"""Which quantization gives the fastest 32-token step, and at what logit error (issue 17).

Usage: .venv/bin/python benchmarks/quant_speed.py [--layers 2] [--prefix 256] [--reps 7] [--threads 2] [--only A,B]

From the cached f16 mini-shaped synthetic file (`dllm bench --synthetic llada2-mini --layers N --quant f16`), builds
quantized variants (cached next to it), then times, round-robin so that load from other processes hits all alike:

* the 32-token step after a ``--prefix``-token KV prefix, all 32 rows out through the confidence head (as
  decoding does), and
* one autoregressive token (causal attention, 1 row out) after the same prefix: the AR baseline on the same file.

Logit error: each variant's step logits against the f16 file's (same runtime, f32 KV, flash attention off), max
abs and argmax agreement over the 32 rows. Variants (``ggml_type`` per tensor class; repack = the CPU extra buffer
type with 8x8 interleaved GEMM kernels for that type on AVX2/AVX-512, which covers MUL_MAT and MUL_MAT_ID):

    q4_k_m        llama.cpp Q4_K_M: Q4_K, with Q6_K for half of ffn_down/attn_v and for the output (no repack)
    q4_k_all      every matrix Q4_K, output Q4_K (all repacked)
    q4_0_all      every matrix Q4_0, output Q4_0 (all repacked)
    iq4_nl_all    every matrix IQ4_NL, output IQ4_NL (all repacked)
    q4_k_moe      dllm's MoE-aware preset (experts Q4_K/Q5_K, the rest Q8_0; Q8_0 and Q5_K not repacked on x86)
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from dllm_cli.bench.synthetic import build_synthetic, synthetic_path
from dllm_cli.runtime import quantize as Q
from dllm_cli.runtime.model import Model
from dllm_cli.runtime.options import RuntimeOptions
from dllm_cli.runtime.session import Session

Q4_0, Q4_K, IQ4_NL = 2, 12, 20
ALL = r"(attn_(qkv|output)|ffn_(gate|up|down)(_exps|_shexp)?)\.weight"
EXTRA = {
    "q4_k_all": Q.QuantPreset("q4_k_all", 15, ((ALL, Q4_K),), Q4_K, "every matrix and the output Q4_K"),
    "q4_0_all": Q.QuantPreset("q4_0_all", 2, ((ALL, Q4_0),), Q4_0, "every matrix and the output Q4_0"),
    "iq4_nl_all": Q.QuantPreset("iq4_nl_all", 25, ((ALL, IQ4_NL),), IQ4_NL, "every matrix and the output IQ4_NL"),
}
VARIANTS = ["q4_k_m", "q4_k_all", "q4_0_all", "iq4_nl_all", "q4_k_moe"]


def variant_path(layers: int, name: str) -> Path:
    f16 = synthetic_path("llada2-mini", layers, "f16")
    if not f16.is_file():
        build_synthetic("llada2-mini", layers=layers, quant="f16")
    out = synthetic_path("llada2-mini", layers, name)
    if not out.is_file():
        Q.PRESETS.update(EXTRA)
        print(f"quantizing {out.name} ...", flush=True)
        Q.quantize(f16, out, name)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--prefix", type=int, default=256)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", default=",".join(VARIANTS))
    args = ap.parse_args()
    names = args.only.split(",")
    paths = {n: variant_path(args.layers, n) for n in names}
    paths["f16"] = synthetic_path("llada2-mini", args.layers, "f16")
    opts = RuntimeOptions(threads=args.threads, ctx_size=args.prefix + 64, ubatch=512, kv_type="f32",
                          flash_attn=False)
    rng = np.random.default_rng(0)
    models = {n: Model(p, opts) for n, p in paths.items()}
    sess = {n: Session(m, opts) for n, m in models.items()}
    B = next(iter(models.values())).block_length
    mask = next(iter(models.values())).mask_id
    prefix = [int(t) for t in rng.integers(0, mask, size=args.prefix)]
    block = [int(t) for t in rng.integers(0, mask, size=B // 2)] + [mask] * (B - B // 2)
    for s in sess.values():
        s.commit(prefix, 0)
    ref = sess["f16"].step(block, args.prefix, range(B), want_logits=True).logits
    step_ms: dict[str, list[float]] = {n: [] for n in names}
    ar_ms: dict[str, list[float]] = {n: [] for n in names}
    err = {}
    for n in names:
        got = sess[n].step(block, args.prefix, range(B), want_logits=True).logits
        err[n] = (float(np.abs(got - ref).max()), float((got.argmax(1) == ref.argmax(1)).mean()))
    for r in range(args.reps + 1):  # steps round-robin across the variants
        for n in names:
            t0 = time.perf_counter()
            sess[n].step(block, args.prefix, range(B))
            if r:
                step_ms[n].append(1e3 * (time.perf_counter() - t0))
    for n in names:  # AR tokens per variant: switching causal attention on and off rebuilds the graph, so once
        s = sess[n]
        s.set_causal(True)
        for r in range(args.reps + 1):
            t0 = time.perf_counter()
            s.extend([block[0]], args.prefix, [0])
            if r:
                ar_ms[n].append(1e3 * (time.perf_counter() - t0))
            s.rollback(args.prefix)
        s.set_causal(False)
    print(f"llada2-mini-L{args.layers}, prefix {args.prefix}, {args.threads} threads, {args.reps} reps (median ms)")
    print("| variant | size MiB | step ms | AR token ms | step / AR | max abs Δlogit vs f16 | argmax agree |")
    print("|---|---|---|---|---|---|---|")
    for n in names:
        st, ar = float(np.median(step_ms[n])), float(np.median(ar_ms[n]))
        print(f"| {n} | {paths[n].stat().st_size / 2**20:.0f} | {st:.1f} | {ar:.1f} | {st / ar:.1f} | "
              f"{err[n][0]:.3f} | {err[n][1]:.3f} |")
    for s in sess.values():
        s.close()
    for m in models.values():
        m.close()


if __name__ == "__main__":
    main()
