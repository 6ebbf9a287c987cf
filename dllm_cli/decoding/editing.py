"""LLaDA2.1 joint Mask-to-Token + Token-to-Token decoding (spec §5.2) and ``make_policy``.

Per step: M2T unmasks every mask with ``p > threshold`` (fallback: the single most confident mask,
``num_to_transfer = 1``); T2T replaces every already-decoded, non-prompt token of the window whose argmax
differs and has ``p > editing_threshold`` (strict, so 0.0 edits *every* differing argmax, it does not disable
editing). Once the block has no masks, each further forward spends one unit of ``max_post_steps`` (checked
before the forward); the block ends after a step that started without masks and edited nothing.
With ``editing=False`` the same M2T rule runs alone and the block ends when its masks are gone.
"""
from __future__ import annotations

import numpy as np

from dllm_cli.decoding.config import DecodeConfig
from dllm_cli.decoding.levenshtein import LevenshteinPolicy
from dllm_cli.decoding.threshold import Policy, ThresholdPolicy, threshold_m2t
from dllm_cli.errors import DecodeError

NUM_TO_TRANSFER = 1


class JointPolicy:
    """M2T (+ T2T when ``editing``) with the post-edit budget."""

    def __init__(self, *, threshold: float, editing_threshold: float, max_post_steps: int, editing: bool) -> None:
        self.threshold = threshold
        self.editing_threshold = editing_threshold
        self.max_post_steps = max_post_steps
        self.edits = editing
        self.post = 0

    def begin_block(self) -> None:
        self.post = 0

    def proceed(self, n_masks: int) -> bool:
        if not self.edits:
            return n_masks > 0
        if n_masks == 0:
            self.post += 1
        return self.post <= self.max_post_steps

    def select(self, x0: np.ndarray, p: np.ndarray, act: np.ndarray, editable: np.ndarray,
               old: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        m2t = threshold_m2t(p, act, self.threshold, NUM_TO_TRANSFER) if act.any() else np.zeros_like(act)
        if not self.edits:
            return m2t, np.zeros_like(act)
        t2t = editable & (p > self.editing_threshold) & (x0 != old)  # [L]
        return m2t, t2t

    def block_done(self, had_masks: bool, edited: bool) -> bool:
        return not had_masks and not edited


def make_policy(config: DecodeConfig, block_length: int, *, mask_id: int = -1,
                edit_ids: tuple[int, int] | None = None) -> Policy | LevenshteinPolicy:
    """2.2: ``LevenshteinPolicy`` (needs ``mask_id`` and the model's DELETE/SPLIT ``edit_ids``); 2.1 (or editing
    asked for): ``JointPolicy``; 2.0 without editing: ``ThresholdPolicy`` with its schedule.

    As in the reference, the 2.0 schedule length is ``min(steps, max_tokens)`` (``minimal_topk = 1``), and the
    2.2 schedule floor's ``steps`` defaults to the block length. Raises ``DecodeError`` for a 2.2 config on a
    model without edit token ids.
    """
    if config.version == "2.2":
        if edit_ids is None:
            raise DecodeError("this LLaDA2.2 model has no DELETE/SPLIT token ids",
                              "re-convert it with `dllm convert` from its checkpoint")
        return LevenshteinPolicy(threshold=config.threshold, editing_threshold=config.editing_threshold,
                                 max_post_steps=config.max_post_steps, editing=config.editing,
                                 indel=config.indel, steps=config.steps or block_length, mask_id=mask_id,
                                 delete_id=edit_ids[0], split_id=edit_ids[1])
    if config.version == "2.0" and not config.editing:
        steps = min(config.steps or block_length, config.max_tokens)
        return ThresholdPolicy(threshold=config.threshold, block_length=block_length, steps=steps)
    return JointPolicy(threshold=config.threshold, editing_threshold=config.editing_threshold,
                       max_post_steps=config.max_post_steps, editing=config.editing)
