"""A regex compiled into a token automaton over a model's vocabulary (outlines-core), as dense numpy tables.

outlines-core's ``Index`` maps (state, token) -> state for the byte strings of the vocabulary. Tokens whose
columns are identical over every state are interchangeable for the automaton, so the tables keep one column per
*token class* (a few hundred for a JSON Schema, against a 157k vocabulary): ``delta[state, class]``. Two classes
and one state are ours:

* ``END`` (the end-of-text / end-of-turn ids): from an accepting state to ``ended``, and ``ended`` -> ``ended``;
* ``NONE`` (control tokens, the mask, LLaDA2.2's DELETE/SPLIT): no transition anywhere;
* ``ended``: the state after the answer; only END ids may follow, and it accepts.

Compiled tables are cached in ``$DLLM_HOME/constraints/<key>.npz`` (key: sha256 of the regex, the vocabulary's
byte strings and end ids, and the table format), written to a unique temporary name and renamed.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from dllm_cli.errors import UsageError, clip

FORMAT = "dllm-automaton-2"
# outlines-core 0.2.x drops the transitions out of a state where the regex already matches into one where it does
# not (``a(xy)?`` admits ``a`` but not ``axy``: regex-automata reports matches one byte late and the Index keeps
# such a step only if it ends in a match). We compile ``(?:regex)SENTINEL`` instead, with SENTINEL a token of our
# own: no proper prefix matches, so every transition survives, and the regex accepts where SENTINEL leads to a
# match. U+10FFFF is a noncharacter no tokenizer holds (tokens containing it are left out).
SENTINEL = "\U0010FFFF".encode()


@dataclass(frozen=True)
class Vocab:
    """A model's tokens as byte strings (``None``: never text, e.g. control tokens) and its end ids."""

    pieces: tuple[bytes | None, ...]
    end_ids: tuple[int, ...]

    @property
    def digest(self) -> str:
        h = hashlib.sha256()
        for p in self.pieces:
            h.update(b"\x00" if p is None else b"\x01" + len(p).to_bytes(4, "little") + p)
        h.update(repr(sorted(self.end_ids)).encode())
        return h.hexdigest()


@dataclass(frozen=True)
class Automaton:
    """Token automaton tables; states ``0..n_states-1`` (``ended`` = n_states-1), dead = ``-1`` in ``delta``."""

    delta: np.ndarray  # [n_states, n_classes] int32: next state, -1 none
    token_class: np.ndarray  # [n_vocab] int32
    initial: int
    accepting: np.ndarray  # [n_states] bool (``ended`` included)
    compile_s: float = 0.0
    cached: bool = False

    @property
    def n_states(self) -> int:
        return int(self.delta.shape[0])

    @property
    def ended(self) -> int:
        return self.n_states - 1


def compile_regex(regex: str, vocab: Vocab, *, cache_dir: Path | None = None) -> Automaton:
    """Compile ``regex`` over ``vocab`` (cached under ``cache_dir`` when given); ``UsageError`` when it cannot be
    compiled or admits no answer at all over this vocabulary."""
    t0 = time.perf_counter()
    key = hashlib.sha256(f"{FORMAT}\x00{regex}\x00{vocab.digest}".encode()).hexdigest()[:32]
    path = cache_dir / f"{key}.npz" if cache_dir is not None else None
    if path is not None and path.is_file():
        got = _load(path)
        if got is not None:
            return _with_time(got, time.perf_counter() - t0, cached=True)
    auto = _build(regex, vocab)
    if not _live(auto)[auto.initial]:
        raise UsageError(f"the constraint {clip(regex, 60)} admits no answer over this model's vocabulary",
                         "loosen the schema or pattern")
    if path is not None:
        _save(path, auto)
    return _with_time(auto, time.perf_counter() - t0, cached=False)


def _with_time(a: Automaton, seconds: float, cached: bool) -> Automaton:
    return Automaton(a.delta, a.token_class, a.initial, a.accepting, seconds, cached)


def _build(regex: str, vocab: Vocab) -> Automaton:
    from outlines_core import Index, Vocabulary

    n_vocab = len(vocab.pieces)
    groups: dict[bytes, list[int]] = {}
    for i, p in enumerate(vocab.pieces):
        if p and i not in vocab.end_ids and SENTINEL not in p:
            groups.setdefault(p, []).append(i)
    groups[SENTINEL] = [n_vocab]  # a token of our own: see SENTINEL
    eos = vocab.end_ids[0] if vocab.end_ids else n_vocab + 1
    try:
        index = Index(f"(?:{regex}){SENTINEL.decode()}", Vocabulary(eos, groups))  # type: ignore[arg-type]
    except (ValueError, TypeError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"the constraint cannot be compiled: {clip(msg, 160, quote=False)}",
                         "check the regex (lookarounds and backreferences are not supported)") from None
    trans = index.get_transitions()
    states = sorted(set(trans) | {int(index.get_initial_state())} | {int(s) for s in index.get_final_states()})
    dense = {s: i for i, s in enumerate(states)}
    S = len(states) + 1  # + ended
    finals = {int(f) for f in index.get_final_states()}
    sig = np.zeros(n_vocab, dtype=np.uint64)
    sig2 = np.zeros(n_vocab, dtype=np.uint64)
    rows: list[tuple[int, np.ndarray, np.ndarray]] = []
    for s, out in trans.items():
        toks = np.fromiter(out.keys(), dtype=np.int64, count=len(out))
        nxt = np.fromiter((dense[v] for v in out.values()), dtype=np.int64, count=len(out))
        keep = toks < n_vocab
        toks, nxt = toks[keep], nxt[keep]
        code = (np.uint64(dense[s]) * np.uint64(S) + nxt.astype(np.uint64) + np.uint64(1))
        with np.errstate(over="ignore"):
            sig[toks] = sig[toks] * np.uint64(1_000_003) + code
            sig2[toks] = (sig2[toks] ^ (code * np.uint64(0x9E3779B97F4A7C15))) * np.uint64(31)
        rows.append((dense[s], toks, nxt))
    both = np.stack([sig, sig2], 1)  # [V, 2]
    _, rep, cls = np.unique(both, axis=0, return_index=True, return_inverse=True)
    cls = cls.reshape(-1).astype(np.int32)
    C = len(rep)
    delta = np.full((S, C + 2), -1, dtype=np.int32)  # classes C: END, C+1: NONE
    for s, toks, nxt in rows:
        delta[s, cls[toks]] = nxt
    pieces_ok = np.array([bool(p) for p in vocab.pieces], dtype=bool)
    cls = np.where(pieces_ok, cls, C + 1).astype(np.int32)
    ends = [e for e in vocab.end_ids if 0 <= e < n_vocab]
    cls[ends] = C
    unused = np.ones(C + 2, dtype=bool)
    unused[cls] = False
    delta[:, unused] = -1  # a class left without tokens (the EOS column outlines-core wrote) moves nothing
    accepting = np.zeros(S, dtype=bool)  # where the regex matches: the states the sentinel leads to a match from
    accepting[[dense[s] for s, out in trans.items() if out.get(n_vocab, -1) in finals]] = True
    delta[accepting, C] = S - 1
    delta[S - 1, C] = S - 1
    accepting[S - 1] = True
    return Automaton(delta, cls, dense[int(index.get_initial_state())], accepting)


def _live(a: Automaton) -> np.ndarray:
    """States from which an accepting state is reachable (zero or more tokens). ``[n_states]`` bool."""
    src, col = np.nonzero(a.delta >= 0)
    dst = a.delta[src, col]
    live = a.accepting.copy()
    while True:
        grown = live.copy()
        grown[src[live[dst]]] = True
        if (grown == live).all():
            return live
        live = grown


def _save(path: Path, a: Automaton) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".part")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, delta=a.delta, token_class=a.token_class, initial=np.int64(a.initial),
                         accepting=a.accepting)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError:
        pass  # the cache is an optimisation: a read-only or full $DLLM_HOME only costs the next compile


def _load(path: Path) -> Automaton | None:
    try:
        with np.load(path) as z:
            return Automaton(z["delta"], z["token_class"], int(z["initial"]), z["accepting"])
    except (OSError, ValueError, KeyError):
        return None  # a damaged entry is rebuilt and replaced


def vocab_from_pieces(pieces: Sequence[bytes | None], end_ids: Sequence[int]) -> Vocab:
    """A ``Vocab`` from per-id byte strings (``None`` or ``b""`` for tokens that are never text)."""
    return Vocab(tuple(p if p else None for p in pieces), tuple(int(e) for e in end_ids))
