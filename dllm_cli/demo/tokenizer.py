"""A small byte-level BPE in the LLaDA2 tokenizer layout (``tokenizer.json`` + ``tokenizer_config.json``).

Used for the tiny test checkpoints and the embedded demo model. The pre-tokenizer regex and the special
tokens follow the LLaDA2 tokenizer (spec §4), so llama.cpp's ``bailingmoe2`` pre-tokenizer applies.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from functools import lru_cache
from pathlib import Path

# The LLaDA2 special tokens, in the order of the real vocabulary (156891 ...).
SPECIAL_TOKENS = (
    "<|startoftext|>", "<|endoftext|>", "[CLS]", "[gMASK]", "<|mask|>",
    "<role>", "</role>", "<|role_end|>", "<think>", "</think>",
)
SPLIT_REGEX = (r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]++[\r\n]*"
               r"|\s*[\r\n]|\s+(?!\S)|\s+")
# A simplified stand-in for Python's ``re`` (no \p classes): only used to train merges.
_TRAIN_SPLIT = re.compile(r"'(?:[sdmt]|ll|ve|re)| ?[A-Za-z]+|[0-9]| ?[^\sA-Za-z0-9]+[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+")

# The LLaDA2 chat template (spec §4), written for this project: system turn first, always carrying
# "detailed thinking off"; user -> HUMAN, assistant -> ASSISTANT, tool -> OBSERVATION.
CHAT_TEMPLATE = (
    "<role>SYSTEM</role>"
    "{% if messages and messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}\n{% endif %}"
    "detailed thinking off<|role_end|>"
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}<role>HUMAN</role>{{ m['content'] }}<|role_end|>"
    "{% elif m['role'] == 'assistant' %}<role>ASSISTANT</role>{{ m['content'] }}<|role_end|>"
    "{% elif m['role'] == 'system' and not loop.first %}<role>SYSTEM</role>{{ m['content'] }}<|role_end|>"
    "{% elif m['role'] == 'tool' %}<role>OBSERVATION</role>\n<tool_response>\n{{ m['content'] }}\n"
    "</tool_response><|role_end|>"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<role>ASSISTANT</role>{% endif %}"
)


@lru_cache(maxsize=1)
def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = keep[:]
    n = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(keep, chars)}


def train_bpe(corpus: list[str], n_merges: int) -> list[tuple[str, str]]:
    """Greedy byte-level BPE merges learned from ``corpus`` (deterministic: ties broken by pair text)."""
    table = byte_to_unicode()
    words: Counter[str] = Counter()
    for text in corpus:
        for piece in _TRAIN_SPLIT.findall(text):
            words["".join(table[b] for b in piece.encode())] += 1
    seqs = {w: list(w) for w in words}
    merges: list[tuple[str, str]] = []
    for _ in range(n_merges):
        pairs: Counter = Counter()
        for w, syms in seqs.items():
            for a, b in zip(syms, syms[1:]):
                pairs[(a, b)] += words[w]
        if not pairs:
            break
        best = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))[0]
        merges.append(best)
        for w, syms in seqs.items():
            out, i = [], 0
            while i < len(syms):
                if i + 1 < len(syms) and (syms[i], syms[i + 1]) == best:
                    out.append(syms[i] + syms[i + 1])
                    i += 2
                else:
                    out.append(syms[i])
                    i += 1
            seqs[w] = out
    return merges


def build_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    """Byte tokens first, then one token per merge, then the special tokens."""
    vocab = {ch: i for i, ch in enumerate(byte_to_unicode()[b] for b in range(256))}
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    for tok in SPECIAL_TOKENS:
        vocab[tok] = len(vocab)
    return vocab


def tokenizer_json(vocab: dict[str, int], merges: list[tuple[str, str]]) -> dict:
    """The ``tokenizer.json`` document of a byte-level BPE with LLaDA2's special tokens."""
    added = [{"id": vocab[t], "content": t, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for t in SPECIAL_TOKENS]
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": SPLIT_REGEX}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}]},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {k: v for k, v in vocab.items() if k not in SPECIAL_TOKENS},
                  "merges": [f"{a} {b}" for a, b in merges]},
    }


def tokenizer_config() -> dict:
    """``tokenizer_config.json`` as the LLaDA2 repos ship it (no BOS/EOS auto-added)."""
    return {
        "add_bos_token": False, "add_eos_token": False, "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "mask_token": "<|mask|>",
        "cls_token": "[CLS]", "model_max_length": 32768, "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": CHAT_TEMPLATE,
    }


def write_tokenizer(directory: Path, merges: list[tuple[str, str]]) -> dict[str, int]:
    """Write ``tokenizer.json`` and ``tokenizer_config.json``; return the vocabulary."""
    vocab = build_vocab(merges)
    (directory / "tokenizer.json").write_text(json.dumps(tokenizer_json(vocab, merges), ensure_ascii=False))
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(), indent=1))
    return vocab
