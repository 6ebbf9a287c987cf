"""Structured output cost: compile time (cold and cached) and the per-forward overhead of a constrained decode.

For each GGUF: read the vocabulary as bytes, compile three JSON Schemas of growing size into token automata
(cold: an empty cache directory; cached: the same call again), then decode one prompt unconstrained and under
each schema, interleaved, ``--reps`` times, and report the median seconds per forward and its ratio to the
unconstrained run ("ratio_end_to_end"). Per forward, because a random-weight model takes a different path under a
constraint; the constrained forward includes the logits read-back, the feasibility passes and the sequential
commit. On a shared machine that ratio is noisy, so the parts are also measured on their own: one 32-row step
without and with the logits read back as a constrained decode reads them (``want_logits="view"``: llama.cpp's
copy to its output buffer, lent to numpy without a further copy; code before that treats "view" as True and
copies), interleaved, and the host time spent in the constraint per forward ("ratio_isolated" = (step +
read-back + constraint host time) / step).

Usage: python benchmarks/structured_overhead.py GGUF [GGUF ...] [--reps 3] [--max-tokens 64] [--mode quality]
       [--threads N]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SMALL = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 16},
                                          "age": {"type": "integer", "minimum": 0, "maximum": 120}},
         "required": ["name", "age"]}
MEDIUM = {"type": "object", "properties": {
    "id": {"type": "integer", "minimum": 0, "maximum": 999},
    "user": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 24},
                                              "email": {"type": "string", "pattern": "^[a-z]{1,12}@[a-z]{1,12}\\.com$"},
                                              "role": {"enum": ["admin", "editor", "viewer"]}},
             "required": ["name", "role"]},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 10}, "maxItems": 4},
    "active": {"type": "boolean"}, "score": {"type": "number"}},
    "required": ["id", "user", "tags", "active"]}
LARGE = {"type": "object", "properties": {
    f"field_{i}": ({"type": "string", "maxLength": 20} if i % 4 == 0 else
                   {"type": "integer", "minimum": 0, "maximum": 500} if i % 4 == 1 else
                   {"enum": ["red", "green", "blue", "cyan"]} if i % 4 == 2 else
                   {"type": "array", "items": {"type": "boolean"}, "maxItems": 3}) for i in range(24)},
    "required": [f"field_{i}" for i in range(0, 24, 2)]}
SCHEMAS = {"small": SMALL, "medium": MEDIUM, "large": LARGE}


def compile_times(model: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    from dllm_cli.constrain import model_vocab
    from dllm_cli.decoding.automaton import compile_regex
    from dllm_cli.decoding.guided import Constraint
    from dllm_cli.decoding.schema import schema_regex

    t0 = time.perf_counter()
    vocab = model_vocab(model)
    vocab_s = time.perf_counter() - t0
    out: dict[str, Any] = {"vocab_read_s": round(vocab_s, 3)}
    built = {}
    with tempfile.TemporaryDirectory() as d:
        for name, schema in SCHEMAS.items():
            regex = schema_regex(schema)
            cold = compile_regex(regex, vocab, cache_dir=Path(d))
            warm = compile_regex(regex, vocab, cache_dir=Path(d))
            out[name] = {"states": cold.n_states, "classes": int(cold.delta.shape[1]),
                         "cold_s": round(cold.compile_s, 3), "cached_s": round(warm.compile_s, 4)}
            built[name] = Constraint("json_schema", name, cold)
    return out, built


GUIDE_S = [0.0]  # CPU seconds spent in Guide.predict / Guide.settle (the constraint's host work)


def _timed(fn: Any) -> Any:
    def wrapper(*a: Any, **kw: Any) -> Any:
        t0 = time.process_time()  # CPU time: a loaded machine stretches wall time, not the work
        try:
            return fn(*a, **kw)
        finally:
            GUIDE_S[0] += time.process_time() - t0
    return wrapper


def per_forward(loaded: Any, ids: list[int], config: Any, constraint: Any) -> tuple[float, float, int, str]:
    """(seconds per forward, constraint host seconds per forward, forwards, text) of one decode."""
    from dllm_cli.generate import generate

    loaded.session.reset()
    GUIDE_S[0] = 0.0
    done = generate(loaded, ids, config, constraint)
    n = max(done.forwards, 1)
    return done.elapsed_s / n, GUIDE_S[0] / n, done.forwards, done.text


def step_cost(loaded: Any, ids: list[int], reps: int) -> dict[str, float]:
    """Median ms of one 32-row step without and with the logits read back ("view", as a decode does; interleaved)."""
    s = loaded.session
    s.reset()
    B = s.block_length
    keep = -(-len(ids) // B) * B  # the prompt padded to whole blocks, then one block of masks, every row out
    s.commit((ids * B)[:keep], 0)
    block = [s.mask_id] * B
    rows = list(range(B))
    plain, logits, cpu_plain, cpu_logits = [], [], [], []
    for _ in range(reps):
        for want, out, cpu in ((False, plain, cpu_plain), (True, logits, cpu_logits)):
            t0, c0 = time.perf_counter(), time.process_time()
            s.step(block, keep, rows, want_logits="view" if want else False)  # "view": as a decode reads them
            out.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    s.reset()
    return {"step_ms": round(1e3 * statistics.median(plain), 2),
            "step_with_logits_ms": round(1e3 * statistics.median(logits), 2),
            "step_cpu_ms": round(1e3 * statistics.median(cpu_plain), 2),
            "step_with_logits_cpu_ms": round(1e3 * statistics.median(cpu_logits), 2), "rows": len(rows)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("gguf", nargs="+")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--mode", default="quality")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    from dllm_cli.generate import decode_config, load
    from dllm_cli.runtime.options import RuntimeOptions

    report: dict[str, Any] = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                              "load_avg_start": os.getloadavg()[0], "models": {}}
    from dllm_cli.decoding.guided import Guide

    Guide.predict = _timed(Guide.predict)  # type: ignore[method-assign]
    Guide.settle = _timed(Guide.settle)  # type: ignore[method-assign]
    for path in args.gguf:
        loaded = load(path, RuntimeOptions(ctx_size=1024, threads=args.threads))
        try:
            comp, built = compile_times(loaded.model)
            ids = loaded.model.tokenize("Write the record as JSON, please.", special=False)
            config = decode_config(loaded.model, args.mode, max_tokens=args.max_tokens)
            cost = step_cost(loaded, ids, 2 * args.reps + 1)
            threads = loaded.session.options.n_threads or os.cpu_count() or 1
            runs: dict[str, list[float]] = {k: [] for k in ["none", *SCHEMAS]}
            host: dict[str, list[float]] = {k: [] for k in runs}
            texts: dict[str, str] = {}
            for _ in range(args.reps):
                for name in runs:
                    s, g, n, text = per_forward(loaded, ids, config, built.get(name))
                    runs[name].append(s)
                    host[name].append(g)
                    texts[name] = text
            base = statistics.median(runs["none"])
            read = cost["step_with_logits_ms"] - cost["step_ms"]
            steps: dict[str, Any] = {"isolated": cost}
            for k, v in runs.items():
                g_ms = 1e3 * statistics.median(host[k])
                steps[k] = {"ms_per_forward": round(1e3 * statistics.median(v), 2),
                            "all_ms": [round(1e3 * x, 1) for x in v], "ratio_end_to_end": round(statistics.median(v) / base, 3),
                            "constraint_host_ms_per_forward": round(g_ms, 2)}
                if k != "none":
                    steps[k]["ratio_isolated"] = round((cost["step_ms"] + read + g_ms) / cost["step_ms"], 3)
                    # quiet-machine estimate from CPU work: the step runs on all threads, the constraint on one
                    par = cost["step_cpu_ms"] / threads
                    extra = max(0.0, cost["step_with_logits_cpu_ms"] - cost["step_cpu_ms"]) + g_ms  # noise: >= 0
                    steps[k]["ratio_cpu_estimate"] = round((par + extra) / par, 3)
            for name, schema in SCHEMAS.items():
                try:
                    json.loads(texts[name])
                    steps[name]["valid_json"] = True
                except ValueError:
                    steps[name]["valid_json"] = False
            report["models"][Path(path).name] = {"compile": comp, "step": steps}
        finally:
            loaded.close()
    report["load_avg_end"] = os.getloadavg()[0]
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
