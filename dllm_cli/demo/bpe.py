"""A pure-Python byte-level BPE encoder that tokenizes like llama.cpp's ``bailingmoe2`` vocabulary.

llama.cpp (with special-token parsing on) first cuts the text at special-token strings, then splits each
remaining span with the pre-tokenizer regex (spec §4), maps every piece's UTF-8 bytes through GPT-2's
byte->unicode table and applies the BPE merges lowest rank first (leftmost on ties). This module does
the same without the third-party ``regex`` package: ``pretokenize`` is a hand-written scanner for

    '(?:[sSdDmMtT]|[lL][lL]|[vV][eE]|[rR][eE])|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*
    |\\s*[\\r\\n]|\\s+(?!\\S)|\\s+

trying the alternatives in order at each position, as a backtracking regex engine does.
"""
from __future__ import annotations

import unicodedata
from typing import Iterable

from dllm_cli.demo.tokenizer import SPECIAL_TOKENS, build_vocab, byte_to_unicode

_CONTRACTIONS = ("s", "d", "m", "t", "ll", "ve", "re")


def _is_letter(c: str) -> bool:
    return unicodedata.category(c).startswith("L")


def _is_number(c: str) -> bool:
    return unicodedata.category(c).startswith("N")


def _is_space(c: str) -> bool:
    return c.isspace()


def _match_at(text: str, i: int) -> int:
    """End index of the regex match starting at ``i`` (always > i)."""
    n, c = len(text), text[i]
    if c == "'":  # contractions
        for suf in ("ll", "ve", "re", "s", "d", "m", "t"):
            if text[i + 1:i + 1 + len(suf)].lower() == suf:
                return i + 1 + len(suf)
    # [^\r\n\p{L}\p{N}]?\p{L}+
    j = i
    if c not in "\r\n" and not _is_letter(c) and not _is_number(c) and i + 1 < n and _is_letter(text[i + 1]):
        j = i + 1
    if _is_letter(text[j]):
        while j < n and _is_letter(text[j]):
            j += 1
        return j
    if _is_number(c):  # \p{N}
        return i + 1
    # ' ?[^\s\p{L}\p{N}]+[\r\n]*'
    j = i + 1 if c == " " else i
    k = j
    while k < n and not _is_space(text[k]) and not _is_letter(text[k]) and not _is_number(text[k]):
        k += 1
    if k > j:
        while k < n and text[k] in "\r\n":
            k += 1
        return k
    # whitespace alternatives: c is whitespace here
    end = i
    while end < n and _is_space(text[end]):
        end += 1
    last_nl = max((p for p in range(i, end) if text[p] in "\r\n"), default=-1)
    if last_nl >= 0:  # \s*[\r\n]: greedy \s* backs off to the last newline of the run
        return last_nl + 1
    if end == n or end - i >= 2:  # \s+(?!\S): the whole run at end of text, else all but its last char
        return end if end == n else end - 1
    return end  # \s+


def pretokenize(text: str) -> list[str]:
    """Split ``text`` (no special tokens) into pre-tokenizer pieces."""
    out, i = [], 0
    while i < len(text):
        j = _match_at(text, i)
        out.append(text[i:j])
        i = j
    return out


class BPE:
    """Encode/decode with a merge list and the LLaDA2 special tokens (ids from ``build_vocab``)."""

    def __init__(self, merges: Iterable[tuple[str, str]]) -> None:
        self.merges: list[tuple[str, str]] = [(a, b) for a, b in merges]
        self.vocab = build_vocab(self.merges)
        self.id_to_token = {i: t for t, i in self.vocab.items()}
        self.ranks = {m: r for r, m in enumerate(self.merges)}
        self.byte_enc = byte_to_unicode()
        self.byte_dec = {c: b for b, c in self.byte_enc.items()}
        self.specials = sorted(SPECIAL_TOKENS, key=len, reverse=True)
        self._cache: dict[str, list[int]] = {}

    def token_id(self, token: str) -> int:
        return self.vocab[token]

    def _bpe(self, piece: str) -> list[int]:
        if piece in self._cache:
            return self._cache[piece]
        syms = [self.byte_enc[b] for b in piece.encode("utf-8")]
        while len(syms) > 1:
            best, at = None, -1
            for k in range(len(syms) - 1):
                r = self.ranks.get((syms[k], syms[k + 1]))
                if r is not None and (best is None or r < best):
                    best, at = r, k
            if best is None:
                break
            syms[at:at + 2] = [syms[at] + syms[at + 1]]
        ids = [self.vocab[s] for s in syms]
        self._cache[piece] = ids
        return ids

    def _split_special(self, text: str) -> list[tuple[str, bool]]:
        parts, i, start = [], 0, 0
        while i < len(text):
            hit = next((s for s in self.specials if text.startswith(s, i)), None)
            if hit is None:
                i += 1
                continue
            if i > start:
                parts.append((text[start:i], False))
            parts.append((hit, True))
            i += len(hit)
            start = i
        if start < len(text):
            parts.append((text[start:], False))
        return parts

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; special-token strings become their single ids."""
        ids: list[int] = []
        for part, special in self._split_special(text):
            if special:
                ids.append(self.vocab[part])
            else:
                for piece in pretokenize(part):
                    ids.extend(self._bpe(piece))
        return ids

    def decode(self, ids: Iterable[int], *, skip_special: bool = False) -> str:
        """Text of ``ids``; ids outside the vocabulary (padding rows) are dropped."""
        out: list[str] = []
        buf = bytearray()
        for i in ids:
            tok = self.id_to_token.get(int(i))
            if tok is None:
                continue
            if tok in SPECIAL_TOKENS:
                out.append(buf.decode("utf-8", errors="replace"))
                buf = bytearray()
                if not skip_special:
                    out.append(tok)
                continue
            buf.extend(self.byte_dec[c] for c in tok)
        out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)


__all__ = ["BPE", "pretokenize"]
