"""Structured output cost: compile time (cold and cached) and the per-forward overhead of a constrained decode.

For each GGUF: read the vocabulary as bytes, compile three JSON Schemas of growing size into token automata
(cold: an empty cache directory; cached: the same call again), then decode one prompt unconstrained and under
each schema, interleaved, ``--reps`` times, and report the median seconds per forward and its ratio to the
unconstrained run. Per forward, because a random-weight model takes a different path under a constraint; the
constrained forward includes the logits read-back, the feasibility passes and the sequential commit.

Usage: python benchmarks/structured_overhead.py GGUF [GGUF ...] [--reps 3] [--max-tokens 64] [--mode quality]
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


def per_forward(loaded: Any, ids: list[int], config: Any, constraint: Any) -> tuple[float, int, str]:
    from dllm_cli.generate import generate

    loaded.session.reset()
    done = generate(loaded, ids, config, constraint)
    return done.elapsed_s / max(done.forwards, 1), done.forwards, done.text


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
    for path in args.gguf:
        loaded = load(path, RuntimeOptions(ctx_size=1024, n_threads=args.threads) if args.threads
                      else RuntimeOptions(ctx_size=1024))
        try:
            comp, built = compile_times(loaded.model)
            ids = loaded.model.tokenize("Write the record as JSON, please.", special=False)
            config = decode_config(loaded.model, args.mode, max_tokens=args.max_tokens)
            runs: dict[str, list[float]] = {k: [] for k in ["none", *SCHEMAS]}
            texts: dict[str, str] = {}
            for _ in range(args.reps):
                for name in runs:
                    s, n, text = per_forward(loaded, ids, config, built.get(name))
                    runs[name].append(s)
                    texts[name] = text
            base = statistics.median(runs["none"])
            steps = {k: {"ms_per_forward": round(1e3 * statistics.median(v), 2),
                         "all_ms": [round(1e3 * x, 1) for x in v],
                         "ratio": round(statistics.median(v) / base, 3)} for k, v in runs.items()}
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
