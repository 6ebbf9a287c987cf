"""Which tokens keep a diffusion canvas completable under a regular constraint: the feasibility check.

A left-to-right grammar engine advances one automaton state per token; a diffusion block is not written left to
right. Its answer region holds a committed prefix (fixed text), then *cells*: tokens placed at any position, masks
(each exactly one token of any kind, end ids included), and after the last cell an unbounded future. Following
Mündler et al., "Constrained Decoding of Diffusion LLMs with Context-Free Grammars" (arXiv 2508.10111), which
reduces the question to additive infilling and, for regular languages, to automaton intersection:

* forward sets ``F[i]``: automaton states reachable after the prefix and cells ``0..i-1`` (a mask moves a set to
  all its successors, a placed token through its transition);
* backward sets ``G[i]``: states from which cells ``i..n-1`` and then *some* future reach acceptance (``G[n]`` =
  the live states);
* the canvas is completable iff ``F[0] ∩ G[0]`` is not empty, and a token ``t`` keeps it completable at cell ``i``
  (whatever cell ``i`` holds now) iff some ``s ∈ F[i]`` has ``delta(s, t) ∈ G[i+1]``.

End-of-text / end-of-turn ids move an accepting state to the absorbing ``ended`` state, which takes only end ids:
so they are allowed only where the automaton accepts, and only masks (to become end ids) or end ids may follow.
This is the check vLLM lacked when it answered ``response_format`` for its diffusion model with HTTP 500
(vllm-project/vllm #45436, where refusing was the proposed fix).

State sets are boolean vectors over the automaton's states, tokens are grouped into classes (``automaton``) and
transitions are kept as edge lists, so a pass costs O(cells × transitions) numpy work, independent of the 157k
vocabulary; allowed sets are per class, expanded to token ids only where a pick needs them (``pick``).
"""
from __future__ import annotations

import numpy as np

from dllm_cli.decoding.automaton import Automaton


class Checker:
    """Feasibility of a canvas under one compiled ``Automaton`` (stateless across canvases; see module doc)."""

    def __init__(self, automaton: Automaton, mask_id: int) -> None:
        a = self.a = automaton
        self.mask_id = int(mask_id)
        S = a.n_states
        self.delta = np.where(a.delta >= 0, a.delta, S).astype(np.int64)  # [S, C]: -1 -> the dead state S
        # transitions as edge lists: O(edges) per cell instead of O(states^2) for a mask
        self.t_src, self.t_cls = np.nonzero(a.delta >= 0)  # [E]
        self.t_dst = a.delta[self.t_src, self.t_cls].astype(np.int64)  # [E]
        pairs = np.unique(self.t_src * S + self.t_dst)  # distinct (state, successor) pairs
        self.e_src, self.e_dst = pairs // S, pairs % S  # [E']
        self.n_classes = int(a.delta.shape[1])
        live = a.accepting.copy()
        while True:
            grown = live.copy()
            grown[self.e_src[live[self.e_dst]]] = True
            if (grown == live).all():
                break
            live = grown
        self.live = np.append(live, False)  # [S + 1]: the dead state is not live
        self._prefix: tuple[tuple[int, ...], int] = ((), a.initial)

    # --- prefix ------------------------------------------------------------------------------
    def prefix_state(self, prefix: np.ndarray) -> int:
        """The state after the committed ``prefix`` ids (-1: the prefix already left the language).

        Cached incrementally: block after block the prefix only grows.
        """
        ids = tuple(int(t) for t in prefix)
        done, state = self._prefix
        if ids[:len(done)] != done:
            done, state = (), self.a.initial
        for t in ids[len(done):]:
            state = -1 if state < 0 else int(self.delta[state, self.a.token_class[t]])
            state = -1 if state >= self.a.n_states else state
        self._prefix = (ids, state)
        return state

    # --- passes ------------------------------------------------------------------------------
    def forward(self, start: np.ndarray, cells: np.ndarray) -> np.ndarray:
        """``F``: ``[n + 1, S]`` bool, ``F[0] = start``."""
        S = self.a.n_states
        F = np.zeros((len(cells) + 1, S), dtype=bool)
        F[0] = start
        for i, t in enumerate(cells.tolist()):
            if t == self.mask_id:
                F[i + 1, self.e_dst[F[i][self.e_src]]] = True
            else:
                nxt = self.delta[F[i], self.a.token_class[t]]  # [k]
                F[i + 1, nxt[nxt < S]] = True
        return F

    def backward(self, cells: np.ndarray) -> np.ndarray:
        """``G``: ``[n + 1, S + 1]`` bool (last column: dead, never set), ``G[n]`` = live states."""
        S = self.a.n_states
        G = np.zeros((len(cells) + 1, S + 1), dtype=bool)
        G[-1] = self.live
        for i in range(len(cells) - 1, -1, -1):
            t = int(cells[i])
            if t == self.mask_id:
                G[i, self.e_src[G[i + 1][self.e_dst]]] = True
            else:
                G[i, :S] = G[i + 1][self.delta[:, self.a.token_class[t]]]
        return G

    def start(self, prefix_state: int) -> np.ndarray:
        s = np.zeros(self.a.n_states, dtype=bool)
        if prefix_state >= 0:
            s[prefix_state] = True
        return s

    def feasible(self, start: np.ndarray, cells: np.ndarray) -> bool:
        """Is the canvas completable: some state reachable after every cell is still live."""
        return bool((self.forward(start, cells)[-1] & self.live[:-1]).any())

    def allowed_classes(self, F_i: np.ndarray, G_next: np.ndarray) -> np.ndarray:
        """Token classes allowed at a cell with forward set ``F_i`` [S] and backward set ``G_next`` [S+1]: [C]."""
        out = np.zeros(self.n_classes, dtype=bool)
        out[self.t_cls[F_i[self.t_src] & G_next[self.t_dst]]] = True
        return out

    def allowed_class_rows(self, start: np.ndarray, cells: np.ndarray, idx: np.ndarray) -> np.ndarray:
        """Allowed token classes ``[len(idx), n_classes]`` bool for the cells ``idx`` of the canvas ``cells``."""
        F, G = self.forward(start, cells), self.backward(cells)
        if not len(idx):
            return np.zeros((0, self.delta.shape[1]), dtype=bool)
        return np.stack([self.allowed_classes(F[i], G[i + 1]) for i in idx.tolist()])  # [k, C]

    def allowed_at(self, start: np.ndarray, cells: np.ndarray, i: int) -> np.ndarray:
        """Allowed token classes ``[n_classes]`` at cell ``i`` alone: one forward pass up to it, one backward pass
        after it (half the work of both full passes)."""
        F_i = self.forward(start, cells[:i])[-1]  # [S]
        G_next = self.backward(cells[i + 1:])[0]  # [S + 1]
        return self.allowed_classes(F_i, G_next)

    def allowed_rows(self, start: np.ndarray, cells: np.ndarray, idx: np.ndarray) -> np.ndarray:
        """Allowed-token masks ``[len(idx), n_vocab]`` bool for the cells ``idx`` of the canvas ``cells``."""
        return self.allowed_class_rows(start, cells, idx)[:, self.a.token_class]  # [k, V]
