"""What spreading a model over ggml RPC workers costs a diffusion step and an autoregressive (AR) token.

Usage: .venv/bin/python benchmarks/rpc_overhead.py MODEL.gguf [--workers 1,2,3] [--reps 5] [--threads 2]
Starts N `dllm rpc-server` workers on loopback, offloads every layer to them (split evenly), and times a 32-token
KV step (all rows out) at a 256-token prefix and one AR token (causal attention, same weights) against the same
model in-process. Bytes per step/token are the workers' TCP traffic, sent plus received (`ss -ti`).
The RPC overhead per generated token is (time with RPC - time alone) divided by the tokens that call yields: one for
AR, the paper's tokens per forward for diffusion (LLaDA2.1-mini: speed 5.34, quality 3.12).
"""
from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from dllm_cli.runtime import rpc
from dllm_cli.runtime.model import Model
from dllm_cli.runtime.options import RuntimeOptions
from dllm_cli.runtime.session import Session

DLLM = str(Path(sys.executable).with_name("dllm"))
PAPER_TPF = {"speed": 5.34, "quality": 3.12}
PREFIX = 256


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def io_bytes(ports: list[int]) -> int:
    """Bytes the workers' sockets sent plus received so far (kernel TCP counters, `ss -ti`)."""
    total = 0
    for port in ports:
        out = subprocess.run(["ss", "-tinH", "state", "established", f"( sport = :{port} )"], capture_output=True,
                             text=True).stdout
        for word in out.split():
            k, _, v = word.partition(":")
            if k in ("bytes_sent", "bytes_received") and v.isdigit():
                total += int(v)
    return total


def measure(path: Path, opts: RuntimeOptions, reps: int, ports: list[int]) -> dict[str, float]:
    with Model(path, opts) as m, Session(m, opts) as s:
        rng = np.random.default_rng(0)
        B = m.block_length
        prefix = [int(t) for t in rng.integers(0, m.mask_id, size=PREFIX)]
        block = [int(t) for t in rng.integers(0, m.mask_id, size=B // 2)] + [m.mask_id] * (B // 2)
        s.commit(prefix, 0)
        s.step(block, PREFIX, range(B))  # warm-up
        b0, t0 = io_bytes(ports), time.perf_counter()
        for _ in range(reps):
            s.step(block, PREFIX, range(B))
        step_s, step_b = (time.perf_counter() - t0) / reps, (io_bytes(ports) - b0) / reps
        s.set_causal(True)
        s.extend([prefix[0]], PREFIX, [0])  # warm-up of the one-token shape
        b0, t0 = io_bytes(ports), time.perf_counter()
        for i in range(reps):
            s.extend([prefix[i + 1]], PREFIX + 1 + i, [0])
        ar_s, ar_b = (time.perf_counter() - t0) / reps, (io_bytes(ports) - b0) / reps
    return {"step_ms": 1e3 * step_s, "step_bytes": step_b, "ar_ms": 1e3 * ar_s, "ar_bytes": ar_b}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", type=Path)
    ap.add_argument("--workers", default="1,2,3")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    base = dict(threads=args.threads, ctx_size=1024, kv_type="f32", flash_attn=False)
    alone = measure(args.model, RuntimeOptions(**base), args.reps, [])
    print("| workers | step ms | AR token ms | bytes/step | bytes/AR token | RPC overhead per token: diffusion speed / "
          "quality vs AR |")
    print("|---|---|---|---|---|---|")
    print(f"| 0 (in-process) | {alone['step_ms']:.0f} | {alone['ar_ms']:.1f} | – | – | – |")
    for n in (int(x) for x in args.workers.split(",")):
        procs, eps = [], []
        for _ in range(n):
            port = free_port()
            procs.append(subprocess.Popen([DLLM, "rpc-server", "--port", str(port), "--threads", str(args.threads)],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            eps.append(rpc.Endpoint("127.0.0.1", port))
        try:
            for ep in eps:
                for _ in range(300):
                    try:
                        rpc.check(ep)
                        break
                    except rpc.RpcError:
                        time.sleep(0.1)
            # a fresh process per worker count: ggml keeps RPC devices registered for the process's lifetime
            code = (f"import json; from pathlib import Path; "
                    f"from benchmarks.rpc_overhead import measure; from dllm_cli.runtime.options import RuntimeOptions; "
                    f"print(json.dumps(measure(Path({str(args.model)!r}), RuntimeOptions(**{base!r}, "
                    f"rpc={','.join(map(str, eps))!r}, n_gpu_layers=999, tensor_split=(1.0,)*{n}), {args.reps}, "
                    f"{[ep.port for ep in eps]!r})))")
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
        finally:
            for p in procs:
                p.terminate()
                p.wait()
        d_step, d_ar = r["step_ms"] - alone["step_ms"], r["ar_ms"] - alone["ar_ms"]
        per = " / ".join(f"{d_step / PAPER_TPF[m] / d_ar:.2f}×" if d_ar > 0 else "n/a" for m in ("speed", "quality"))
        print(f"| {n} | {r['step_ms']:.0f} | {r['ar_ms']:.1f} | {r['step_bytes'] / 1e6:.2f} MB | "
              f"{r['ar_bytes'] / 1e6:.3f} MB | {per} |", flush=True)


if __name__ == "__main__":
    main()
