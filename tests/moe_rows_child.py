"""Child of test_moe_rows.py: ``moe_rows_child.py MODEL OUT.npz REPACK``. Loads MODEL (with CPU weight repacking when
REPACK is 1) in this process's environment (``DLLM_MOE_ROWS`` is read once by the runtime), and saves the logits of
steps of 1, 3, 5 and 32 tokens after a 32-token prefix, of one AR token, the greedy tokens of quality and speed
generation, and the load log."""
from __future__ import annotations

import json
import sys
from dataclasses import replace

import numpy as np

from dllm_cli.decoding import engine
from dllm_cli.decoding.events import DoneEvent
from dllm_cli.generate import decode_config
from dllm_cli.runtime import options
from dllm_cli.runtime.library import captured_log
from dllm_cli.runtime.model import Model
from dllm_cli.runtime.session import Session


def main() -> None:
    path, out, repack = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
    opts = replace(options.EXACT, ctx_size=256, ubatch=256, threads=2, repack=repack)
    with captured_log() as log:
        model = Model(path, opts)
    rng = np.random.default_rng(3)
    ids = [int(t) for t in rng.integers(0, model.mask_id, size=64)]
    res: dict[str, object] = {"log": "".join(log)}
    with Session(model, opts) as s:
        s.commit(ids[:32], 0)
        for n in (1, 3, 5, 32):
            step = ids[32:32 + n - 1] + [model.mask_id]
            res[f"step{n}"] = np.array(s.step(step, 32, range(n), want_logits=True).logits)
        s.set_causal(True)
        res["ar"] = np.array(s.step(ids[32:33], 32, [0], want_logits=True).logits)
        s.set_causal(False)
    tokens = {}
    for mode in ("quality", "speed"):
        with Session(model, opts) as s:
            cfg = decode_config(model, mode, max_tokens=48)
            done = [e for e in engine.generate(s, ids[:20], cfg, rng=np.random.default_rng(cfg.seed))
                    if isinstance(e, DoneEvent)]
            tokens[mode] = [int(t) for t in done[-1].ids]
    res["tokens"] = json.dumps(tokens)
    np.savez(out, **res)  # type: ignore[arg-type]
    model.close()


if __name__ == "__main__":
    main()
