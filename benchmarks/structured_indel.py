"""Host cost of a constrained LLaDA2.2 step with insert/delete on, against the same decode with them off.

The vocabulary is a real GGUF's (157k byte strings for the mini-shaped synthetic files), plus a DELETE and a SPLIT id
of our own; the model is a random-logits ``ScriptedModel`` (no forward is timed: logits are fresh Gaussian noise, with
DELETE/SPLIT raised so edits compete). Timed, in CPU time (``time.process_time``): everything the constraint adds per
forward, that is ``Guide.predict`` / ``Guide.settle`` with indel off, and ``EditGuide.predict`` / ``EditGuide.settle``
(which call them) with indel on, for the three schemas of ``structured_overhead.py``.

Usage: python benchmarks/structured_indel.py GGUF [--reps 2] [--max-tokens 64] [--block 32]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def time_outermost(methods: list[tuple[Any, str]], bucket: list[float]) -> None:
    """Wrap each ``(class, name)`` so the CPU time of outermost calls is added to ``bucket`` (``EditGuide``'s
    methods call ``Guide``'s: their time is counted once)."""
    depth = [0]
    for cls, name in methods:
        real = getattr(cls, name)

        def wrapper(*a: Any, _real: Any = real, **kw: Any) -> Any:
            t0 = time.process_time()
            depth[0] += 1
            try:
                return _real(*a, **kw)
            finally:
                depth[0] -= 1
                if depth[0] == 0:
                    bucket.append(time.process_time() - t0)

        setattr(cls, name, wrapper)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("gguf")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--block", type=int, default=32)
    args = ap.parse_args()

    import numpy as np

    from dllm_cli.constrain import json_schema, model_vocab
    from dllm_cli.decoding import ScriptedModel, collect, generate, make_config
    from dllm_cli.decoding.automaton import Vocab
    from dllm_cli.decoding.guided import Guide
    from dllm_cli.decoding.guided_indel import EditGuide
    from dllm_cli.generate import load
    from dllm_cli.runtime.options import RuntimeOptions
    from structured_overhead import SCHEMAS

    loaded = load(args.gguf, RuntimeOptions(ctx_size=256))
    try:
        base = model_vocab(loaded.model)
        mask_id, eos_id = int(loaded.model.mask_id), int(base.end_ids[0])
    finally:
        loaded.close()
    V = len(base.pieces) + 2
    delete_id, split_id = V - 2, V - 1
    vocab = Vocab(base.pieces + (None, None), base.end_ids)
    built = {name: json_schema(vocab, schema) for name, schema in SCHEMAS.items()}

    spent: list[float] = []
    time_outermost([(Guide, "predict"), (Guide, "settle"), (EditGuide, "predict"), (EditGuide, "settle")], spent)

    def model(seed: int) -> Any:
        rng = np.random.default_rng(seed)

        def script(n: int, tokens: list[int], start: int) -> Any:
            lg = rng.standard_normal((len(tokens), V)).astype(np.float32) * 3.0
            lg[:, [delete_id, split_id]] += 6.0
            return lg

        return ScriptedModel(script, n_vocab=V, mask_id=mask_id, eos_id=eos_id, block_length=args.block,
                             n_ctx=4096, edit_ids=(delete_id, split_id))

    report: dict[str, Any] = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                              "load_avg_start": os.getloadavg()[0], "gguf": args.gguf, "vocab": V, "results": {}}
    for name, c in built.items():
        for indel in (False, True):
            per: list[float] = []
            counts = {"forwards": 0, "inserts": 0, "deletes": 0}
            for rep in range(args.reps):
                spent.clear()
                cfg = make_config("quality", "2.2", max_tokens=args.max_tokens, seed=rep, indel=indel)
                done = collect(generate(model(rep), [1, 2, 3], cfg, constraint=c))
                per.append(1000 * sum(spent) / max(done.forwards, 1))
                counts["forwards"] += done.forwards
                counts["inserts"] += done.inserts
                counts["deletes"] += done.deletes
            report["results"][f"{name}/{'indel' if indel else 'no-indel'}"] = {
                "constraint_ms_per_forward": round(statistics.median(per), 3), **counts}
            print(name, "indel" if indel else "no-indel", per, flush=True)
    report["load_avg_end"] = os.getloadavg()[0]
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
