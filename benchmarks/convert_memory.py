"""Peak memory and throughput of ``dllm convert`` on a synthetic multi-GB LLaDA2 checkpoint.

Writes a bf16 checkpoint with LLaDA2-mini shapes (vocab 157184, H 2048, 16/4 heads, D 128, 256 experts of
width 512, dense 5120) but fewer layers, streaming each shard to disk from a small random pool so the
generator itself stays low-memory; then runs ``dllm convert`` in a child process per output type and
reports the child's peak RSS (its own ``VmHWM``) and MB/s of source read.

    .venv/bin/python benchmarks/convert_memory.py --workdir /tmp/dllm-convert-bench --layers 3

The work directory is deleted at the end unless ``--keep``.
"""
from __future__ import annotations

import argparse
import json
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from converters.safetensors import f32_to_bf16  # noqa: E402
from dllm_cli.demo.checkpoint import tensor_shapes, tiny_config  # noqa: E402
from dllm_cli.demo.tokenizer import train_bpe, write_tokenizer  # noqa: E402

MINI = dict(hidden_size=2048, num_attention_heads=16, num_key_value_heads=4, head_dim=128, intermediate_size=5120,
            moe_intermediate_size=512, num_experts=256, num_experts_per_tok=8, num_shared_experts=1, n_group=8,
            topk_group=4, first_k_dense_replace=1, vocab_size=157184, max_position_embeddings=32768,
            torch_dtype="bfloat16", _name_or_path="synthetic/LLaDA2.1-bench")
SHARD_BYTES = 2 << 30
POOL = 1 << 23  # 8M random bf16 values, reused cyclically


def write_shard(path: Path, shapes: dict[str, tuple[int, ...]], pool: np.ndarray) -> None:
    """A safetensors file written tensor by tensor, in 16 MB slices of the random pool."""
    header, offset = {}, 0
    for name, shape in shapes.items():
        n = int(np.prod(shape)) * (4 if name.endswith("expert_bias") else 2)
        header[name] = {"dtype": "F32" if name.endswith("expert_bias") else "BF16", "shape": list(shape),
                        "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        pos = 0
        for name, shape in shapes.items():
            count = int(np.prod(shape))
            if name.endswith("expert_bias"):
                f.write(np.zeros(count, np.float32).tobytes())
                continue
            while count:
                take = min(count, POOL - pos)
                pool[pos:pos + take].tofile(f)
                count -= take
                pos = (pos + take) % POOL


def generate(directory: Path, layers: int) -> tuple[dict, int]:
    directory.mkdir(parents=True, exist_ok=True)
    cfg = tiny_config(**MINI, num_hidden_layers=layers)
    write_tokenizer(directory, train_bpe(["synthetic benchmark text"], 10))
    (directory / "config.json").write_text(json.dumps(cfg, indent=1))
    rng = np.random.default_rng(0)
    pool = f32_to_bf16((rng.standard_normal(POOL) * 0.02).astype(np.float32))
    shards: list[dict] = [{}]
    size = 0
    for name, shape in tensor_shapes(cfg).items():
        n = int(np.prod(shape)) * 2
        if size + n > SHARD_BYTES and shards[-1]:
            shards.append({})
            size = 0
        shards[-1][name] = shape
        size += n
    weight_map = {}
    for i, group in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_shard(directory / fname, group, pool)
        weight_map.update({n: fname for n in group})
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return cfg, sum(p.stat().st_size for p in directory.glob("*.safetensors"))


# ru_maxrss of a forked child keeps the parent's (numpy, the random pool) high-water mark across exec;
# VmHWM belongs to the exec'd image only, so the child reports its own at exit.
_CHILD = """import sys
sys.argv = ['dllm'] + sys.argv[1:]
from dllm_cli.cli.app import main
try:
    main()
finally:
    hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]
    print('VmHWM_kB', hwm, file=sys.stderr)
"""


def measure(src: Path, out: Path, outtype: str) -> dict:
    args = ["convert", str(src), "-o", str(out), "--outtype", outtype, "--force"]
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", _CHILD, *args], capture_output=True, text=True, cwd=ROOT)
    secs = time.monotonic() - t0
    if proc.returncode != 0:
        raise SystemExit(f"convert failed: {proc.stderr}")
    hwm = int(proc.stderr.rsplit("VmHWM_kB", 1)[1].split()[0])
    return {"outtype": outtype, "seconds": round(secs, 1), "peak_rss_mb": round(hwm / 1024),
            "out_gb": round(out.stat().st_size / 1e9, 2), "cmd": "dllm " + " ".join(args)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/dllm-convert-bench"))
    ap.add_argument("--layers", type=int, default=3, help="1 dense + (layers-1) MoE layers (default 3: 4.6 GB)")
    ap.add_argument("--outtypes", nargs="+", default=["bf16", "f16", "q8_0"])
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    src = args.workdir / "ckpt"
    try:
        t0 = time.monotonic()
        cfg, nbytes = generate(src, args.layers)
        print(f"generated {nbytes / 1e9:.2f} GB in {time.monotonic() - t0:.0f}s: "
              f"{args.layers} layers, H {cfg['hidden_size']}, {cfg['num_experts']} experts, vocab {cfg['vocab_size']}")
        for t in args.outtypes:
            r = measure(src, args.workdir / f"out-{t}.gguf", t)
            r["mb_per_s"] = round(nbytes / 1e6 / r["seconds"])
            print(json.dumps(r))
            (args.workdir / f"out-{t}.gguf").unlink()
    finally:
        if not args.keep:
            shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
