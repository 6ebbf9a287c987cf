"""On-device confidence head vs reading the logits and doing the same in numpy.

Per step, both paths decode one 32-token block with all rows as outputs and produce, per row, the top-2 token ids
and their full-vocabulary probabilities with the mask token excluded:

  host    decode (raw logits copied to the host) + ``top2_from_logits`` (float32) on the zero-copy logits view
  device  ``llama_dllm_set_confidence(ctx, true, mask, keep_logits=false)``: decode + ``llama_dllm_get_confidence``

Usage: python benchmarks/confidence_head.py [--gguf PATH] [--vocab 157184] [--hidden 512] [--rows 32] [--reps 20]
Without ``--gguf`` it writes a random LLaDA2 GGUF with the real vocabulary size (f32) to a temp dir.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dllm_cli.runtime import bindings  # noqa: E402
from dllm_cli.runtime.library import load  # noqa: E402
from dllm_cli.decoding.stepper import top2_from_logits  # noqa: E402


def make_gguf(out_dir: Path, vocab: int, hidden: int, layers: int) -> Path:
    from converters import convert
    from dllm_cli.demo.checkpoint import tiny_config, write_checkpoint

    ckpt = out_dir / "ckpt"
    cfg = tiny_config(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=hidden // 16,
                      num_key_value_heads=max(1, hidden // 64), head_dim=16)
    base = write_checkpoint(ckpt, cfg, vocab_pad=0)
    write_checkpoint(ckpt, cfg, vocab_pad=max(0, vocab - base["vocab_size"]))
    return convert(ckpt, out_dir / "bench-f32.gguf", outtype="f32").path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf", type=Path)
    ap.add_argument("--vocab", type=int, default=157184)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=0, help="0 = all cores")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()

    rt = load()
    lib = rt.lib
    tmp = tempfile.TemporaryDirectory()
    path = a.gguf or make_gguf(Path(tmp.name), a.vocab, a.hidden, a.layers)
    model = lib.llama_model_load_from_file(str(path).encode(), lib.llama_model_default_params())
    n_vocab = lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(model))
    mask = lib.llama_vocab_mask(lib.llama_model_get_vocab(model))
    mask = mask if mask >= 0 else n_vocab - 1
    p = lib.llama_context_default_params()
    p.n_ctx, p.n_batch, p.n_ubatch, p.n_seq_max = 256, a.rows, a.rows, 1
    import os
    p.n_threads = p.n_threads_batch = a.threads or os.cpu_count() or 1
    # one context per path: toggling the head on a context forces a scheduler re-reserve and a graph rebuild
    ctxs = {name: lib.llama_init_from_model(model, p) for name in ("host", "device", "device+logits")}
    bindings.set_confidence(rt, ctxs["device"], True, mask, False)
    bindings.set_confidence(rt, ctxs["device+logits"], True, mask, True)
    b = lib.llama_batch_init(a.rows, 0, 1)
    toks = np.random.default_rng(0).integers(0, n_vocab, a.rows)
    for i in range(a.rows):
        b.token[i], b.pos[i], b.n_seq_id[i], b.seq_id[i][0], b.logits[i] = int(toks[i]), i, 1, 0, 1
    b.n_tokens = a.rows

    def decode(ctx) -> float:
        t0 = time.perf_counter()
        assert lib.llama_decode(ctx, b) == 0
        lib.llama_synchronize(ctx)
        return time.perf_counter() - t0

    def host_step():
        ctx = ctxs["host"]
        td = decode(ctx)
        t0 = time.perf_counter()
        view = np.ctypeslib.as_array(lib.llama_get_logits(ctx), shape=(a.rows, n_vocab))
        host = top2_from_logits(view, mask, dtype=np.float32)
        ids, probs = host.ids, host.probs
        tr = time.perf_counter() - t0
        lib.llama_memory_seq_rm(lib.llama_get_memory(ctx), 0, 0, -1)
        return td, tr, ids, probs

    def device_step(name: str):
        ctx = ctxs[name]
        td = decode(ctx)
        t0 = time.perf_counter()
        ids, probs = bindings.get_confidence(rt, ctx, a.rows)
        tr = time.perf_counter() - t0
        lib.llama_memory_seq_rm(lib.llama_get_memory(ctx), 0, 0, -1)
        return td, tr, ids, probs

    runs = {"host": host_step, "device": lambda: device_step("device"),
            "device+logits": lambda: device_step("device+logits")}
    res: dict[str, dict] = {}
    outs = {}
    for fn in runs.values():  # warm-up: graph build per mode
        fn()
    # round-robin, so load from other processes hits every path alike
    all_samples: dict[str, list] = {name: [] for name in runs}
    for _ in range(a.reps):
        for name, fn in runs.items():
            all_samples[name].append(fn())
    for name, samples in all_samples.items():
        outs[name] = samples[-1][2:]
        dec = [s[0] for s in samples]
        red = [s[1] for s in samples]
        tot = [s[0] + s[1] for s in samples]
        res[name] = {"decode_ms": 1e3 * statistics.median(dec), "readout_ms": 1e3 * statistics.median(red),
                     "step_ms": 1e3 * statistics.median(tot)}
    # same answer both ways
    agree = float((outs["host"][0] == outs["device"][0]).mean())
    dp = float(np.abs(outs["host"][1] - outs["device"][1]).max())
    model = (f"{Path(a.gguf).name}, vocab {n_vocab}" if a.gguf else
             f"random LLaDA2, {a.layers} layers, hidden {a.hidden}, vocab {n_vocab}, f32 weights")
    meta = {"model": model,
            "rows": a.rows, "threads": p.n_threads, "backend": rt.backend, "machine": platform.processor() or platform.machine(),
            "reps": a.reps, "id_agreement": agree, "max_prob_diff": dp}
    if a.json:
        print(json.dumps({"meta": meta, "results": res}, indent=1))
    else:
        print(f"{meta['model']}; {a.rows} output rows; {p.n_threads} threads; {rt.backend}; median of {a.reps}, modes interleaved")
        print("| path | decode ms | readout ms | step ms |\n|---|---|---|---|")
        for name, r in res.items():
            print(f"| {name} | {r['decode_ms']:.1f} | {r['readout_ms']:.2f} | {r['step_ms']:.1f} |")
        print(f"top-2 id agreement host/device {agree:.3f}, max |p diff| {dp:.2e}")
    lib.llama_batch_free(b)
    for ctx in ctxs.values():
        lib.llama_free(ctx)
    lib.llama_model_free(model)
    return 0


if __name__ == "__main__":
    sys.exit(main())
