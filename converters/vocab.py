"""``tokenizer.json`` (byte-level BPE) -> GGUF ``gpt2`` vocabulary with LLaDA2's special ids.

Special ids are resolved by string (spec §4): id 156895 means ``<|role_end|>`` in the Ling 2.0 vocab it
descends from and ``<|mask|>`` here, so no id is ever assumed.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gguf import GGUFWriter, TokenType

from converters.base import read_json
from dllm_cli import gguf_keys as K
from dllm_cli.errors import ConvertError, clip
from dllm_cli.text import vocab_text_problem

MASK_TOKEN = "<|mask|>"
EOS_TOKEN = "<|endoftext|>"
EOT_TOKEN = "<|role_end|>"
BOS_TOKEN = "<|startoftext|>"


@dataclass(frozen=True)
class Vocab:
    """Everything the GGUF tokenizer section needs."""

    tokens: list[str]
    types: list[int]
    merges: list[str]
    mask_id: int
    eos_id: int
    pad_id: int
    bos_id: int | None
    eot_id: int | None
    chat_template: str | None


def _token_text(value: object, where: str) -> str | None:
    # tokenizer_config.json writes special tokens either as a string or as an AddedToken dict
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise ConvertError(f"tokenizer_config.json: {where} has an unexpected form {value!r}")


def _token_id(value: object, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ConvertError(f"tokenizer.json: {where} must be a token id (an integer >= 0), got {value!r}",
                           "re-download the tokenizer")
    return value


def _check_texts(tokens: list[str | None], merges: list[str]) -> None:
    """Every token text and merge must be text llama.cpp can hold (no NUL byte, valid Unicode)."""
    for what, texts in (("token", tokens), ("merge", merges)):
        for i, t in enumerate(texts):
            problem = vocab_text_problem(t) if t is not None else None
            if problem:
                raise ConvertError(f"tokenizer.json: {what} {i} ({clip(t, 40)}) {problem}",
                                   "re-download the tokenizer")


def load_vocab(directory: Path, vocab_size: int, pad_token_id: int | None = None) -> Vocab:
    """Read ``tokenizer.json`` (+ ``tokenizer_config.json``) and lay it out over ``vocab_size`` rows."""
    doc = read_json(directory / "tokenizer.json", "tokenizer.json",
                    "the checkpoint must ship its Hugging Face fast tokenizer (tokenizer.json)")
    model = doc.get("model") or {}
    if not isinstance(model, dict) or model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        kind = model.get("type") if isinstance(model, dict) else type(model).__name__
        raise ConvertError(f"tokenizer.json in {directory} is not a BPE tokenizer (model.type={kind!r})",
                           "only byte-level BPE tokenizers (as LLaDA2 ships) are supported")
    ids: dict[str, int] = {}
    for text, i in model["vocab"].items():
        ids[text] = _token_id(i, f"model.vocab[{text!r}]")
    special: set[int] = set()
    user: set[int] = set()
    added = doc.get("added_tokens") or []
    if not isinstance(added, list):
        raise ConvertError("tokenizer.json: added_tokens must be a list", "re-download the tokenizer")
    for n, tok in enumerate(added):
        if not isinstance(tok, dict) or not isinstance(tok.get("content"), str) or not tok["content"]:
            raise ConvertError(f"tokenizer.json: added_tokens[{n}] needs a non-empty string 'content'",
                               "re-download the tokenizer")
        i = _token_id(tok.get("id"), f"added_tokens[{n}].id")
        ids[tok["content"]] = i
        (special if tok.get("special") else user).add(i)
    if not ids:
        raise ConvertError("tokenizer.json defines no tokens", "re-download the tokenizer")
    n_defined = max(ids.values()) + 1
    if n_defined > vocab_size:
        raise ConvertError(f"tokenizer.json defines id {n_defined - 1} but config.json vocab_size is {vocab_size}",
                           "the tokenizer and config.json belong to different models")
    tokens: list[str | None] = [None] * vocab_size
    for text, i in ids.items():
        if tokens[i] is not None and tokens[i] != text:
            raise ConvertError(f"tokenizer.json maps both {tokens[i]!r} and {text!r} to id {i}",
                               "re-download the tokenizer")
        tokens[i] = text
    types = []
    for i, t in enumerate(tokens):
        if t is None:
            pad = f"[PAD{i}]"
            while pad in ids:  # token texts must stay unique (llama.cpp asserts it)
                pad += "_"
            tokens[i] = pad
            types.append(int(TokenType.UNUSED))
        else:
            types.append(int(TokenType.CONTROL if i in special else TokenType.USER_DEFINED if i in user
                             else TokenType.NORMAL))
    raw_merges = model.get("merges") or []
    if not isinstance(raw_merges, list) or not all(
            isinstance(m, str) or (isinstance(m, list) and len(m) == 2 and all(isinstance(x, str) for x in m))
            for m in raw_merges):
        raise ConvertError("tokenizer.json: model.merges must be a list of 'a b' strings or [a, b] pairs",
                           "re-download the tokenizer")
    merges = [m if isinstance(m, str) else " ".join(m) for m in raw_merges]
    _check_texts(tokens, merges)

    cfg_path = directory / "tokenizer_config.json"
    tcfg = read_json(cfg_path, "tokenizer_config.json", "re-download the checkpoint") if cfg_path.is_file() else {}

    def need(text: str, role: str) -> int:
        if text not in ids:
            raise ConvertError(f"tokenizer.json has no {text} token (the {role})",
                               "this is not a LLaDA2 tokenizer; convert the matching checkpoint")
        return ids[text]

    mask_id = need(MASK_TOKEN, "diffusion mask")
    eos_id = need(EOS_TOKEN, "end of text")
    pad_text = _token_text(tcfg.get("pad_token"), "pad_token")
    if pad_text is not None:
        pad_id = need(pad_text, "padding token")
    elif isinstance(pad_token_id, int) and not isinstance(pad_token_id, bool) and 0 <= pad_token_id < vocab_size:
        pad_id = pad_token_id
    else:
        pad_id = eos_id
    bos_text = _token_text(tcfg.get("bos_token"), "bos_token") or BOS_TOKEN
    template = tcfg.get("chat_template")
    if isinstance(template, list):  # named templates: keep the default one
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"),
                        None)
    return Vocab(tokens=[t for t in tokens if t is not None], types=types, merges=merges, mask_id=mask_id,
                 eos_id=eos_id, pad_id=pad_id, bos_id=ids.get(bos_text), eot_id=ids.get(EOT_TOKEN),
                 chat_template=template if isinstance(template, str) else None)


def write_vocab(writer: GGUFWriter, vocab: Vocab) -> None:
    """The ``tokenizer.*`` keys (upstream names through GGUFWriter's typed calls, ids via gguf_keys)."""
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(K.PRE_TOKENIZER)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    writer.add_token_merges(vocab.merges)
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)
    writer.add_uint32(K.MASK_ID, vocab.mask_id)
    writer.add_uint32(K.EOS_ID, vocab.eos_id)
    writer.add_uint32(K.PAD_ID, vocab.pad_id)
    if vocab.bos_id is not None:
        writer.add_uint32(K.BOS_ID, vocab.bos_id)
    if vocab.eot_id is not None:
        writer.add_uint32(K.EOT_ID, vocab.eot_id)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)
