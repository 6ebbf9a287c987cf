"""Logit error of each runtime configuration (KV type x flash attention) against the float64 numpy reference.

Usage: .venv/bin/python benchmarks/flash_attn.py [--workdir DIR] [--decodes]
Two random f32 checkpoints: the project's tiny test model (GQA 4/2, 2 groups) and a no-GQA one (hidden 256,
3 layers with 1 dense, 4 heads and 4 KV heads of 64, 16 experts top-4, n_group = topk_group = 1, lm_head x4).
For the first block (no prefix) and after a 32-token prefix, every row of a half-masked block is compared.
``--decodes`` also runs greedy decodes (quality, speed, threshold-only; three prompts) and counts how many give
the exact path's tokens.
"""
from __future__ import annotations

import argparse
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np

from converters import convert
from dllm_cli.decoding import engine
from dllm_cli.decoding.config import make_config
from dllm_cli.demo.checkpoint import tiny_config, write_checkpoint
from dllm_cli.reference import load_gguf
from dllm_cli.runtime.model import Model
from dllm_cli.runtime.options import RuntimeOptions
from dllm_cli.runtime.session import Session

B = 32
CONFIGS = {  # name -> (kv_type, flash_attn)
    "f32 KV, FA off (exact)": ("f32", False), "f16 KV, FA off": ("f16", False),
    "f32 KV, FA on": ("f32", True), "f16 KV, FA on": ("f16", True),
}
NO_GQA = dict(hidden_size=256, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, head_dim=64,
              intermediate_size=512, moe_intermediate_size=128, num_experts=16, num_experts_per_tok=4, n_group=1,
              topk_group=1)


def checkpoints(d: Path) -> dict[str, Path]:
    write_checkpoint(d / "tiny", tiny_config(), seed=11, head_scale=2.0)
    write_checkpoint(d / "nogqa", tiny_config(**NO_GQA), seed=3, head_scale=4.0)
    return {name: convert(d / name, d / f"{name}-f32.gguf", outtype="f32", force=True).path for name in ("tiny", "nogqa")}


def errors(path: Path, kv: str, fa: bool, threads: int) -> tuple[float, float]:
    """Max abs logit error (first block, after a 32-token prefix) of one configuration."""
    ref = load_gguf(path, np.float64)
    opts = RuntimeOptions(kv_type=kv, flash_attn=fa, ctx_size=256, threads=threads)
    rng = np.random.default_rng(0)
    out = []
    with Model(path, opts) as m, Session(m, opts) as s:
        for start in (0, B):
            ids = [int(t) for t in rng.integers(0, m.mask_id, size=start + B // 2)] + [m.mask_id] * (B // 2)
            s.reset()
            if start:
                s.commit(ids[:start], 0)
            got = s.step(ids[start:], start, range(B), want_logits=True).logits
            out.append(float(np.abs(got - ref.forward(np.asarray(ids))[start:]).max()))
    return out[0], out[1]


def decodes(path: Path, kv: str, fa: bool, threads: int) -> list[list[int]]:
    opts = RuntimeOptions(kv_type=kv, flash_attn=fa, ctx_size=512, threads=threads)
    got = []
    with Model(path, opts) as m, Session(m, opts) as s:
        for mode, over in (("quality", {}), ("speed", {}), ("quality", {"editing": False})):
            cfg = make_config(mode, "2.1", m.presets, max_tokens=64, stop_ids=(), **over)
            for seed in range(3):
                prompt = [int(t) for t in np.random.default_rng(seed).integers(0, m.mask_id, size=20)]
                s.reset()
                done = None
                for ev in engine.generate(s, prompt, cfg, rng=np.random.default_rng(0), detokenize=m.detokenize):
                    done = ev
                got.append(list(done.ids))
    return got


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--decodes", action="store_true")
    args = ap.parse_args()
    files = checkpoints(args.workdir or Path(tempfile.mkdtemp(prefix="dllm-fa-")))
    print("| checkpoint | configuration | first block, no prefix | after a 32-token prefix |")
    print("|---|---|---|---|")
    for name, path in files.items():
        for label, (kv, fa) in CONFIGS.items():
            a, b = errors(path, kv, fa, args.threads)
            print(f"| {name} | {label} | {a:.3g} | {b:.3g} |")
    if args.decodes:
        print("\n| checkpoint | configuration | decodes equal to the exact path |")
        print("|---|---|---|")
        for name, path in files.items():
            exact = decodes(path, "f32", False, args.threads)
            for label, (kv, fa) in list(CONFIGS.items())[1:]:
                same = sum(a == b for a, b in zip(decodes(path, kv, fa, args.threads), exact))
                print(f"| {name} | {label} | {same}/{len(exact)} |")


if __name__ == "__main__":
    main()
