"""Multi-Block Editing (MBE), experimental: an *inferred* design (spec §5.4; no public implementation exists).

The LLaDA2.1 report only says MBE lets the model "revisit and revise previously generated blocks based on the
content of newly decoded blocks". Under the strict block-causal mask a finished block's logits never see later
blocks, so re-running it changes nothing; revision therefore needs the earlier blocks to *attend to* the newer one.
Our design:

* keep the last ``N`` finished blocks uncommitted (their K/V are not in the cache);
* while decoding block ``k`` forward the window of blocks ``max(k0, k-N) .. k`` in one ``step`` call with
  ``attn_block=0`` (bidirectional inside the window, block-causal to the committed prefix);
* apply M2T only to block ``k`` and T2T (``editing_threshold``) to every non-prompt token of the window;
* a block is final, emitted and committed when it leaves the window (or when generation stops).

KV discipline (spec §3.11): only blocks that can no longer change are committed, and an edited block that is
still in the window is simply forwarded again at the next step, so nothing committed is ever stale.
``mbe=0`` is the ordinary single-block decoder: the window is the active block alone.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Window:
    """Which blocks are editable, and which become final after each finished block."""

    first: int  # k0: the first generation block (holds the prompt tail)
    size: int  # N finished blocks kept editable
    next_final: int = -1  # first block not yet finalized

    def __post_init__(self) -> None:
        self.next_final = self.first

    def start(self, k: int) -> int:
        """First block of the window while decoding block ``k``."""
        return max(self.first, k - self.size, self.next_final)

    def finalize(self, k: int, stop: bool) -> list[int]:
        """Blocks that become final after block ``k`` finished: all remaining ones when stopping."""
        last = k if stop else k - self.size
        out = list(range(self.next_final, last + 1))
        self.next_final = max(self.next_final, last + 1)
        return out
