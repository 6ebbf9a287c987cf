"""Test helper: a scripted LLaDA2.2 decode with readable tokens, written as a ``dllm run --trace`` file.

One 8-token block: ``The cat cat sat on`` is unmasked first, the stuttered ``cat`` is deleted (the row closes up
and a mask is pulled in at the end), a slot is inserted before ``cat`` and filled with ``big``:
``The big cat sat on the mat.``. Steps are stamped ``gap_s`` apart so a replay is paced like a slow model.
"""
from __future__ import annotations

import json
from pathlib import Path

from dllm_cli.cli.replay import trace_record
from dllm_cli.decoding import ScriptedModel, generate, make_config

M, EOS, DEL, SPL = 15, 14, 12, 13
WORDS = {1: " The", 2: " cat", 3: " sat", 4: " on", 5: " the", 6: " mat", 7: ".", 8: " big", EOS: "<|endoftext|>",
         DEL: "<|delete|>", SPL: "<|split|>", M: "<|mask|>"}
TARGETS = [  # what the model predicts at each step, per position of the current block (p 0.9; masks 0.2 unless hit)
    ([1, 2, 2, 3, 4, 5, 6, 7], {0, 1, 2, 3, 4}),       # unmask "The cat cat sat on"
    ([1, 2, DEL, 3, 4, 5, 6, 7], {2, 5}),              # delete the stutter; unmask "the"
    ([1, SPL, 3, 4, 5, 6, 7, 7], {1, 5, 6}),           # insert a slot before "cat"; unmask "mat" "."
    ([1, 8, 2, 3, 4, 5, 6, 7], {1}),                   # fill the slot with "big"
    ([1, 8, 2, 3, 4, 5, 6, 7], set()),                 # nothing changes: the block ends
]


def _frame(n: int, tokens: list[int], start: int) -> tuple[list[int], list[float]]:
    ids, hit = TARGETS[min(n, len(TARGETS) - 1)]
    probs = [0.9 if (j in hit or tokens[j] != M) else 0.2 for j in range(len(tokens))]
    return list(ids), probs


def write_story(path: Path, gap_s: float = 0.6) -> Path:
    """Write the trace (one JSON line per event, pieces included) and return ``path``."""
    model = ScriptedModel(_frame, n_vocab=16, mask_id=M, eos_id=EOS, block_length=8, edit_ids=(DEL, SPL))
    config = make_config("speed", "2.2", max_tokens=8, threshold=0.5, editing_threshold=0.5)
    seen: set[int] = set()
    lines = []
    step = 0
    for ev in generate(model, [], config, detokenize=lambda ids: "".join(WORDS[i] for i in ids)):
        d = trace_record(ev, WORDS.__getitem__, seen)
        if "elapsed_s" in d:
            step += d["event"] == "step"
            d["elapsed_s"] = round(step * gap_s, 3)
        lines.append(json.dumps(d))
    path.write_text("\n".join(lines) + "\n")
    return path
