"""Runtime logits vs the numpy reference on each file's own (dequantized) weights: the error distribution.

Usage: .venv/bin/python benchmarks/exactness.py [--workdir DIR]
A random 3-layer LLaDA2 (hidden 256, 8 experts top-2, 2 groups) is converted to f32 and q8_0 and quantized
to q4_k_m and q4_k_moe; prompts of 40/100/300 tokens; every row of the first active block is compared.
"""
from __future__ import annotations

from dataclasses import replace

import argparse
import tempfile
from pathlib import Path

import numpy as np

from converters import convert
from dllm_cli.demo.checkpoint import tiny_config, write_checkpoint
from dllm_cli.reference import load_gguf
from dllm_cli.runtime.model import Model
from dllm_cli.runtime import options
from dllm_cli.runtime.quantize import quantize
from dllm_cli.runtime.session import Session

B = 32
OPTS = replace(options.EXACT, ctx_size=512, threads=2)


def distribution(path: Path) -> dict:
    ref = load_gguf(path, np.float64)
    rng = np.random.default_rng(0)
    errs, agree = [], []
    with Model(path, OPTS) as m, Session(m, OPTS) as s:
        for P in (40, 100, 300):
            W = (P // B + 1) * B
            ids = [int(t) for t in rng.integers(0, m.mask_id, size=P)] + [m.mask_id] * (W - P)
            st = (P // B) * B
            s.reset()
            s.commit(ids[:st], 0)
            got = s.step(ids[st:], st, range(W - st), want_logits=True).logits
            want = ref.forward(np.asarray(ids))[st:W]
            errs += list(np.abs(got - want).max(axis=1))
            agree += list(got.argmax(1) == want.argmax(1))
    e = np.asarray(errs)
    return {"rows": len(e), "max": e.max(), "p99": np.percentile(e, 99), "p50": np.median(e), "agree": np.mean(agree)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    d = args.workdir or Path(tempfile.mkdtemp(prefix="dllm-exact-"))
    cfg = tiny_config(hidden_size=256, intermediate_size=512, moe_intermediate_size=256, head_dim=64)
    write_checkpoint(d / "ckpt", cfg, seed=4, head_scale=2.0)
    f32 = convert(d / "ckpt", d / "m-f32.gguf", outtype="f32", force=True).path
    files = {"f32": f32, "q8_0": convert(d / "ckpt", d / "m-q8_0.gguf", outtype="q8_0", force=True).path}
    for preset in ("q4_k_m", "q4_k_moe"):
        files[preset] = quantize(f32, d / f"m-{preset}.gguf", preset, force=True)
    print("| file | size | rows | max abs err | p99 | p50 | argmax agreement |")
    print("|---|---|---|---|---|---|---|")
    for name, path in files.items():
        r = distribution(path)
        print(f"| {name} | {path.stat().st_size / 1e6:.2f} MB | {r['rows']} | {r['max']:.3g} | {r['p99']:.3g} | "
              f"{r['p50']:.3g} | {r['agree']:.3f} |")


if __name__ == "__main__":
    main()
