"""Block-diffusion training noise for the demo model (torch-free, so it is tested without the ``[train]`` extra).

One training window per example: the clean sequence up to a random answer block k, with block k noised —
answer positions masked at a per-block ratio t ~ U(0.02, 1), some remaining answer tokens replaced by wrong
ones (T2T editing data) — and per-position loss weights.
"""
from __future__ import annotations

import numpy as np

from dllm_cli.demo import tasks
from dllm_cli.demo.bpe import BPE

B = tasks.BLOCK_LENGTH
W_MASKED, W_CORRUPT, W_KEEP = 1.0, 1.0, 0.3


class Noiser:
    """Turns a token sequence into one (input, target, weight) training window."""

    def __init__(self, bpe: BPE, answer_ids: np.ndarray) -> None:
        self.bpe, self.answer_ids = bpe, answer_ids
        self.mask_id, self.eos_id = bpe.token_id("<|mask|>"), bpe.token_id("<|endoftext|>")
        self.n_text = 256 + len(bpe.merges)  # ids below are ordinary (non-special) tokens

    def encode(self, ex: tasks.Example, rng: np.random.Generator) -> tuple[np.ndarray, int, np.ndarray | None]:
        """Prompt + answer ids padded to whole blocks, the prompt length, and for a question with free wording
        the same sequence in another correct wording (None when there is none of the same token length)."""
        prompt = self.bpe.encode(tasks.render_prompt(ex))
        full = prompt + self.bpe.encode(tasks.render_target(ex))
        n = tasks.pad_to_block(len(full))

        def padded(seq: list[int]) -> np.ndarray:
            return np.asarray(seq + [self.eos_id] * (n - len(seq)), dtype=np.int64)

        alt = None
        if ex.accept:
            other = prompt + self.bpe.encode(ex.accept[int(rng.integers(len(ex.accept)))] + tasks.ROLE_END)
            alt = padded(other) if len(other) == len(full) else None
        return padded(full), len(prompt), alt

    def wrong_token(self, rng: np.random.Generator, seq: np.ndarray, i: int, alt: np.ndarray | None = None) -> int:
        r = rng.random()
        if alt is not None and alt[i] != seq[i]:
            # a token of another correct wording: the mixed words ("nood" from nice/good) that parallel
            # decoding commits when two wordings are nearly equally likely
            if 0.3 <= r < 0.7:
                return int(alt[i])
            r = 0.8 if r >= 0.9 else min(r, 0.79)
        if r < 0.3 and i > 0:
            return int(seq[i - 1])  # stutter: repeat the left neighbour, the typical parallel-decoding slip
        if r < 0.8:
            return int(self.answer_ids[rng.integers(len(self.answer_ids))])
        return int(rng.integers(self.n_text))

    def window(self, rng: np.random.Generator, full: np.ndarray, p_len: int, alt: np.ndarray | None = None):
        k = int(rng.integers(p_len // B, len(full) // B))
        w = (k + 1) * B
        x, y = full[:w].copy(), full[:w].copy()
        wt = np.zeros(w, dtype=np.float32)
        pos = np.arange(max(p_len, k * B), w)
        masked = rng.random(len(pos)) < rng.uniform(0.02, 1.0)
        corrupt = ~masked & (rng.random(len(pos)) < rng.uniform(0.0, 0.25))
        x[pos[masked]] = self.mask_id
        for i in pos[corrupt]:
            x[i] = self.wrong_token(rng, full, i, alt)
        wt[pos] = W_KEEP
        wt[pos[masked]] = W_MASKED
        wt[pos[corrupt & (x[pos] != full[pos])]] = W_CORRUPT
        return x, y, wt


def answer_pool(noiser: Noiser, seed: int, families=tasks.TASKS) -> np.ndarray:
    ids = [t for ex in tasks.examples(seed, 2000, heldout=False, families=families) for t in noiser.bpe.encode(tasks.render_target(ex))]
    return np.asarray(ids + [noiser.eos_id] * (len(ids) // 4), dtype=np.int64)
