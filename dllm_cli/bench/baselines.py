"""The two baselines run on the same weights and runtime as the diffusion decoder.

* **Full-window recompute**: no KV prefix; every step re-decodes ``[0, (k+1)B)`` block-causally, as
  llama.cpp's diffusion CLI does. ``recompute_step`` times one such step.
* **Autoregressive**: causal attention (``llama_set_causal_attn``), one token per forward with a KV cache, greedy;
  what a Ling/BailingMoeV2 user of llama.cpp gets from the same weights. ``ar_decode`` times it.

For random-weight models the diffusion tokens per forward say nothing, so the AR ratio is also reported at
the papers' average tokens per forward (spec §6, ``PAPER_TPF``) and labelled so.
"""
from __future__ import annotations

import time
from typing import Sequence

import numpy as np

from dllm_cli.runtime.session import Session

# Average TPF over the benchmark suites (spec §6.1 / §6.2, Table 2 and Table 1 averages)
PAPER_TPF = {
    "llada2.0-mini/quality": 2.60, "llada2.0-mini/speed": 2.60,
    "llada2.1-mini/speed": 5.34, "llada2.1-mini/quality": 3.12,
    "llada2.0-flash/quality": 3.08, "llada2.0-flash/speed": 3.08,
    "llada2.1-flash/speed": 5.93, "llada2.1-flash/quality": 3.64,
}
# --synthetic shape -> key; no LLaDA2.2-mini TPF is published: its shape borrows the 2.1-mini figure
PAPER_TPF_DEFAULT = {"llada2-mini": "llada2.1-mini", "llada2-flash": "llada2.1-flash", "llada2.2-mini": "llada2.1-mini"}


def recompute_step(session: Session, window: Sequence[int], block: int, rows: int | None = None) -> float:
    """Seconds for one step without a KV prefix: the whole window, block-causal, logits for the last rows."""
    session.reset()
    n = len(window)
    rows = block if rows is None else max(1, rows)
    t0 = time.perf_counter()
    session.step(list(window), 0, range(n - rows, n), attn_block=block)
    return time.perf_counter() - t0


def ar_decode(session: Session, prompt: Sequence[int], n_tokens: int) -> float:
    """Seconds to decode ``n_tokens`` greedily one per forward (the prompt prefill is not timed).

    The session must be in causal mode (``session.set_causal(True)``).
    """
    session.reset()
    session.commit(list(prompt), 0)
    pos = len(prompt)
    tok = int(prompt[-1])
    t0 = time.perf_counter()
    for _ in range(n_tokens):
        logits = session.extend([tok], pos, [0])
        tok = int(np.argmax(logits[0]))  # type: ignore[index]
        pos += 1
    return time.perf_counter() - t0
