"""A small byte-level vocabulary and a random-logits scripted model for the structured-output tests.

Ids: printable ASCII characters one per token, some multi-character tokens, the two UTF-8 bytes of ``é`` as two
tokens (one character, several byte-level tokens), every non-ASCII byte alone (as byte-level BPE has), then EOS, end-of-turn, DELETE, SPLIT and MASK.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from dllm_cli.decoding import ScriptedModel
from dllm_cli.decoding.automaton import Vocab, vocab_from_pieces

MULTI = [b'{"', b'":', b'", "', b'"name"', b"true", b"null", b"false", b"<tool_call>", b"</tool_call>",
         b"\n", b"\xc3", b"\xa9", b"\xc3\xa9t\xc3\xa9", b"  ", b"12", b"-0", b"e+", b"\xe2\x82", b"\xac"]
PIECES: list[bytes | None] = [bytes([c]) for c in range(32, 127)] + MULTI + [bytes([c]) for c in range(0x80, 0x100)]
EOS, EOT, DELETE, SPLIT, MASK = len(PIECES), len(PIECES) + 1, len(PIECES) + 2, len(PIECES) + 3, len(PIECES) + 4
V = MASK + 1
ALL: list[bytes | None] = PIECES + [None] * 5


def vocab() -> Vocab:
    return vocab_from_pieces(ALL, (EOS, EOT))


def detok(ids: list[int]) -> str:
    return b"".join(ALL[i] or b"" for i in ids if i not in (EOS, EOT)).decode("utf-8", errors="replace")


def answer(ids: list[int] | tuple[int, ...]) -> str:
    """Text up to the first end id."""
    out: list[int] = []
    for i in ids:
        if i in (EOS, EOT):
            break
        out.append(i)
    return detok(out)


def random_model(seed: int, *, block_length: int = 8, scale: float = 3.0, v22: bool = False,
                 bias: dict[int, float] | None = None) -> ScriptedModel:
    """A model whose logits are fresh Gaussian noise every call (garbage when unconstrained)."""
    rng = np.random.default_rng(seed)

    def script(n: int, tokens: list[int], start: int) -> Any:
        lg = rng.standard_normal((len(tokens), V)).astype(np.float32) * scale  # [L, V]
        for t, b in (bias or {}).items():
            lg[:, t] += b
        return lg

    return ScriptedModel(script, n_vocab=V, mask_id=MASK, eos_id=EOS, block_length=block_length, n_ctx=4096,
                         edit_ids=(DELETE, SPLIT) if v22 else None)
