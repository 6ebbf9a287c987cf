"""Every metadata value and relation llama.cpp's loader and the llada2 graph rely on, checked in Python first.

llama.cpp reports most inconsistent hyper-parameters with ``GGML_ASSERT``, which aborts the whole process
(exit 134). The relations below are the asserts of the pinned tree (``src/llama-model.cpp`` ``load_hparams``,
``src/models/bailingmoe2.cpp``, ``src/llama-graph.cpp`` ``build_moe_ffn``/``build_qkv``, ``ggml_rope``/
``ggml_argsort_top_k`` shape asserts, ``src/llama-vocab.cpp`` token table) plus the key types the loader
insists on, and dllm's own keys (presets, block length, version, template). ``validate`` runs before a file
reaches llama.cpp, for loading and for quantizing; each problem is a ``ModelError`` naming the key.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFValueType

from dllm_cli import gguf_keys as K
from dllm_cli.domains import DOMAINS
from dllm_cli.errors import ModelError
from dllm_cli.text import vocab_text_problem
from dllm_cli.registry import MODES, Preset

MAX_LAYERS = 512  # LLAMA_MAX_LAYERS
MAX_EXPERTS = 1024  # LLAMA_MAX_EXPERTS
MAX_BLOCK_LENGTH = 4096  # far above any released block size (32); bounds the context a block rounds up to
MAX_TEMPLATE_CHARS = 1 << 20
VERSIONS = ("2.0", "2.1", "2.2")
ROPE_SCALING = ("none", "linear", "yarn", "longrope")  # llama_rope_scaling_type_from_string
CONTROL = 3  # gguf TokenType.CONTROL

_INTS = (GGUFValueType.UINT8, GGUFValueType.INT8, GGUFValueType.UINT16, GGUFValueType.INT16, GGUFValueType.UINT32,
         GGUFValueType.INT32, GGUFValueType.UINT64, GGUFValueType.INT64)
_FLOATS = (GGUFValueType.FLOAT32, GGUFValueType.FLOAT64)
# weights must be float or quantized; integer tensors have no matmul kernel (ggml aborts on the graph)
_BAD_TENSOR_TYPES = {GGMLQuantizationType.I8, GGMLQuantizationType.I16, GGMLQuantizationType.I32,
                     GGMLQuantizationType.I64, GGMLQuantizationType.F64}


@dataclass(frozen=True)
class ModelMeta:
    """The validated values Python itself uses."""

    n_vocab: int
    head_dim: int
    block_length: int
    version: str
    presets: dict[str, Preset] | None  # None: the file has none; use the registry's for ``version``
    mask_id: int
    chat_template: str | None
    edit_ids: tuple[int, int] | None = None  # LLaDA2.2 (DELETE, SPLIT) token ids; None before 2.2


class _Keys:
    """Typed access to a GGUF's key/value section; every failure names the key."""

    def __init__(self, reader: GGUFReader, path: Path) -> None:
        self.reader, self.path = reader, path

    def fail(self, key: str, problem: str) -> ModelError:
        return ModelError(f"{self.path}: metadata {key} {problem}", "re-convert the model with `dllm convert`")

    def kind(self, key: str) -> GGUFValueType | None:
        field = self.reader.get_field(key)
        return None if field is None else field.types[0]

    def value(self, key: str) -> Any:
        field = self.reader.get_field(key)
        return None if field is None else field.contents()

    def u32(self, key: str, default: int | None = None, *, lo: int = 0, hi: int = 2**32 - 1) -> int:
        """A scalar UINT32 (the only type llama.cpp's ``get_key<uint32_t>`` accepts) in ``lo..hi``."""
        kind = self.kind(key)
        if kind is None:
            if default is None:
                raise self.fail(key, "is missing")
            return default
        if kind != GGUFValueType.UINT32:
            raise self.fail(key, f"must be a uint32, not {kind.name.lower()}")
        v = int(self.value(key))
        if not lo <= v <= hi:
            raise self.fail(key, f"is {v}, must be " + (f"at least {lo}" if hi == 2**32 - 1 else f"in {lo}..{hi}"))
        return v

    def f32(self, key: str, default: float | None = None, *, positive: bool = False) -> float:
        kind = self.kind(key)
        if kind is None:
            if default is None:
                raise self.fail(key, "is missing")
            return default
        if kind != GGUFValueType.FLOAT32:
            raise self.fail(key, f"must be a float32, not {kind.name.lower()}")
        v = float(self.value(key))
        if not math.isfinite(v) or (positive and v <= 0):
            raise self.fail(key, f"is {v}, must be a finite {'positive ' if positive else ''}number")
        return v

    def boolean(self, key: str, default: bool) -> bool:
        kind = self.kind(key)
        if kind is None:
            return default
        if kind != GGUFValueType.BOOL:
            raise self.fail(key, f"must be a bool, not {kind.name.lower()}")
        return bool(self.value(key))

    def string(self, key: str) -> str | None:
        kind = self.kind(key)
        if kind is None:
            return None
        if kind != GGUFValueType.STRING:
            raise self.fail(key, f"must be a string, not {kind.name.lower()}")
        return str(self.value(key))

    def number(self, key: str, *, integer: bool) -> float | None:
        """dllm's own numeric keys: any int (or, unless ``integer``, float) type, finite."""
        kind = self.kind(key)
        if kind is None:
            return None
        if kind not in _INTS and (integer or kind not in _FLOATS):
            raise self.fail(key, f"must be {'an integer' if integer else 'a number'}, not {kind.name.lower()}")
        v = float(self.value(key))
        if not math.isfinite(v):
            raise self.fail(key, f"is {v}, must be a finite number")
        if kind == GGUFValueType.FLOAT32:  # the shortest decimal that rounds to it: 0.7, not 0.699999988
            v = float(str(np.float32(v)))
        return v


def validate(reader: GGUFReader, path: Path) -> ModelMeta:
    """Check ``reader``'s metadata and tensor table; raise ModelError naming the key or tensor."""
    k = _Keys(reader, path)
    n_vocab, mask_id = _vocab(k)
    hp = _hparams(k, n_vocab)
    _tensors(reader, path, hp)
    version = _version(k)
    return ModelMeta(n_vocab=n_vocab, head_dim=hp["head_dim"], block_length=k.u32(K.BLOCK_LENGTH, 32, lo=1,
                                                                                   hi=MAX_BLOCK_LENGTH),
                     version=version, presets=_presets(k, version), mask_id=mask_id, chat_template=_template(k),
                     edit_ids=_edit_ids(k, n_vocab, mask_id) if version == "2.2" else None)


def _edit_ids(k: _Keys, n_vocab: int, mask_id: int) -> tuple[int, int]:
    """LLaDA2.2's DELETE and SPLIT (INSERT) ids: required, inside the vocabulary, distinct, not the mask."""
    ids = (k.u32(K.DELETE_ID, hi=n_vocab - 1), k.u32(K.SPLIT_ID, hi=n_vocab - 1))
    for key, i in zip((K.DELETE_ID, K.SPLIT_ID), ids):
        if i == mask_id:
            raise k.fail(key, f"is {i}, the mask token's id")
    if ids[0] == ids[1]:
        raise k.fail(K.SPLIT_ID, f"is {ids[1]}, the same id as {K.DELETE_ID}")
    return ids


def _hparams(k: _Keys, n_vocab: int) -> dict[str, int]:
    """The bailingmoe2/llada2 hyper-parameters and every relation the loader or the graph asserts on."""
    def bad(key: str, relation: str) -> ModelError:
        return k.fail(key, relation)

    n_layer = k.u32(K.BLOCK_COUNT, lo=1, hi=MAX_LAYERS)
    k.u32(K.CONTEXT_LENGTH, lo=1)
    n_embd = k.u32(K.EMBEDDING_LENGTH, lo=1)
    n_head = k.u32(K.HEAD_COUNT, lo=1)
    n_head_kv = k.u32(K.HEAD_COUNT_KV, n_head, lo=1)
    if n_head % n_head_kv:
        raise bad(K.HEAD_COUNT_KV, f"({n_head_kv}) must divide {K.HEAD_COUNT} ({n_head})")
    head_dim = k.u32(K.KEY_LENGTH, n_embd // n_head, lo=1)
    if k.u32(K.VALUE_LENGTH, n_embd // n_head, lo=1) != head_dim:
        raise bad(K.VALUE_LENGTH, f"must equal {K.KEY_LENGTH} ({head_dim})")
    if n_head * head_dim != n_embd:
        raise bad(K.EMBEDDING_LENGTH, f"({n_embd}) must equal {K.HEAD_COUNT} x head dim ({n_head} x {head_dim})")
    n_rot = k.u32(K.ROPE_DIM, head_dim)
    if not 0 < n_rot <= head_dim or n_rot % 2:
        raise bad(K.ROPE_DIM, f"({n_rot}) must be an even number of dims in 2..head dim ({head_dim})")
    scaling = k.string(f"{K.ARCH}.rope.scaling.type")
    if scaling is not None and scaling not in ROPE_SCALING:
        raise bad(f"{K.ARCH}.rope.scaling.type", f"is {scaling!r}, not one of {', '.join(ROPE_SCALING)}")
    n_dense = k.u32(K.LEADING_DENSE, 0, hi=n_layer)
    n_ff = k.u32(K.FEED_FORWARD_LENGTH, 0)
    if n_dense and n_ff < 1:
        raise bad(K.FEED_FORWARD_LENGTH, f"must be at least 1 with {n_dense} dense layers")
    if k.u32(K.NEXTN_LAYERS, 0):
        raise bad(K.NEXTN_LAYERS, "must be 0 (multi-token-prediction layers are not supported)")
    n_expert = k.u32(K.EXPERT_COUNT, lo=1, hi=MAX_EXPERTS)
    n_used = k.u32(K.EXPERT_USED, lo=1, hi=n_expert)
    n_shared = k.u32(K.EXPERT_SHARED_COUNT, lo=1)
    n_ff_exp = k.u32(K.EXPERT_FFN, lo=1)
    n_ff_shexp = k.u32(K.EXPERT_SHARED_FFN, 0) or n_ff_exp
    if k.u32(K.EXPERT_GATING) != K.GATING_SIGMOID:
        raise bad(K.EXPERT_GATING, f"must be {K.GATING_SIGMOID} (sigmoid routing, as LLaDA2 is trained)")
    groups = k.u32(K.EXPERT_GROUPS, 0)
    if groups >= n_expert:
        raise bad(K.EXPERT_GROUPS, f"({groups}) must be less than {K.EXPERT_COUNT} ({n_expert})")
    if groups > 1:
        per_group = n_expert // groups
        if n_expert % groups or per_group < 2:
            raise bad(K.EXPERT_GROUPS, f"({groups}) must divide {K.EXPERT_COUNT} ({n_expert}) into groups of 2 or more")
        used = k.u32(K.EXPERT_GROUPS_USED, 0)
        if not 0 < used < groups:
            raise bad(K.EXPERT_GROUPS_USED, f"({used}) must be in 1..{K.EXPERT_GROUPS} - 1 ({groups - 1})")
        if n_used > used * per_group:
            raise bad(K.EXPERT_USED,
                      f"({n_used}) exceeds the experts of the {used} selected groups ({used * per_group})")
    k.f32(K.RMS_EPS, positive=True)
    k.f32(K.ROPE_FREQ_BASE, 10000.0, positive=True)
    k.f32(K.EXPERT_SCALE, 1.0)
    k.boolean(K.EXPERT_NORM, False)
    if k.boolean(K.CAUSAL, False):
        raise bad(K.CAUSAL, "must be false (a diffusion model attends bidirectionally)")
    k.boolean(K.SHIFT_LOGITS, False)
    vocab_key = k.u32(K.VOCAB_SIZE, n_vocab)
    if vocab_key != n_vocab:
        raise bad(K.VOCAB_SIZE, f"({vocab_key}) differs from the {n_vocab} tokens of tokenizer.ggml.tokens")
    return {"n_layer": n_layer, "n_embd": n_embd, "n_head": n_head, "n_head_kv": n_head_kv, "head_dim": head_dim,
            "n_dense": n_dense, "n_ff": n_ff, "n_expert": n_expert, "n_ff_exp": n_ff_exp,
            "n_ff_shexp": n_ff_shexp * n_shared, "n_vocab": n_vocab}


def _check_texts(k: _Keys, key: str, field: Any) -> None:
    """Every string of ``field`` as raw bytes: a NUL byte or invalid UTF-8 reaches llama.cpp asserts."""
    raws = [bytes(field.parts[i]) for i in field.data]
    if vocab_text_problem(b"\n".join(raws)) is None:  # fast path: an ASCII separator breaks any UTF-8 sequence,
        return                                          # so the join is valid exactly when every entry is
    for n, raw in enumerate(raws):
        problem = vocab_text_problem(raw)
        if problem:
            raise k.fail(key, f"entry {n} ({raw[:40]!r}) {problem}")


def _vocab(k: _Keys) -> tuple[int, int]:
    """Token table (unique texts: llama.cpp asserts it) and special ids inside it; returns (n_vocab, mask id)."""
    if k.string("tokenizer.ggml.model") != "gpt2":
        raise k.fail("tokenizer.ggml.model", "must be 'gpt2' (byte-level BPE, as LLaDA2 ships)")
    field = k.reader.get_field("tokenizer.ggml.tokens")
    if field is None or field.types[:2] != [GGUFValueType.ARRAY, GGUFValueType.STRING]:
        raise k.fail("tokenizer.ggml.tokens", "is missing or not a string array")
    _check_texts(k, "tokenizer.ggml.tokens", field)
    tokens = [t or f"[EMPTY_{i}]" for i, t in enumerate(field.contents())]  # llama.cpp renames empty tokens
    n_vocab = len(tokens)
    if n_vocab < 1 or n_vocab >= 2**31:
        raise k.fail("tokenizer.ggml.tokens", f"has {n_vocab} tokens")
    if len(set(tokens)) != n_vocab:
        dup = next(t for t, n in Counter(tokens).items() if n > 1)
        raise k.fail("tokenizer.ggml.tokens", f"lists {dup!r} twice (token texts must be unique)")
    types = k.reader.get_field("tokenizer.ggml.token_type")
    if types is not None and (types.types[:2] != [GGUFValueType.ARRAY, GGUFValueType.INT32]
                              or len(types.data) < n_vocab):
        raise k.fail("tokenizer.ggml.token_type", f"must be an int32 array of at least {n_vocab} entries")
    merges = k.reader.get_field("tokenizer.ggml.merges")
    if merges is None or merges.types[:2] != [GGUFValueType.ARRAY, GGUFValueType.STRING]:
        raise k.fail("tokenizer.ggml.merges", "is missing or not a string array")
    _check_texts(k, "tokenizer.ggml.merges", merges)
    ids: dict[str, int] = {}
    for key in (K.MASK_ID, K.EOS_ID, K.BOS_ID, K.PAD_ID, K.EOT_ID):  # only the mask id is required
        ids[key] = k.u32(key, hi=n_vocab - 1) if key == K.MASK_ID or k.kind(key) is not None else -1
    mask_id = ids[K.MASK_ID]
    for key in (K.EOS_ID, K.EOT_ID):
        if ids[key] == mask_id:
            raise k.fail(key, f"equals {K.MASK_ID} ({mask_id}); the mask token cannot end a turn")
    return n_vocab, mask_id


def _version(k: _Keys) -> str:
    v = k.string(K.MODEL_VERSION)
    if v is None:
        return "2.1"
    if v not in VERSIONS:
        raise k.fail(K.MODEL_VERSION, f"is {v!r}, not one of {', '.join(VERSIONS)}")
    return v


def _presets(k: _Keys, version: str) -> dict[str, Preset] | None:
    """``dllm.preset.<mode>.*``: all four fields of every mode, or none at all (registry defaults).

    A 2.2 file also stores ``indel``; one written before the Levenshtein decoder existed has none and M2T-only
    presets, so its presets are ignored (None: the registry's 2.2 presets apply).
    """
    if version == "2.2" and not any(k.kind(K.preset_key(m, "indel")) is not None for m in MODES):
        return None
    out: dict[str, Preset] = {}
    for mode in MODES:
        keys = {f: K.preset_key(mode, f) for f in K.PRESET_FIELDS}
        present = [f for f, key in keys.items() if k.kind(key) is not None]
        if not present:
            continue
        missing = [keys[f] for f in K.PRESET_FIELDS if f not in present]
        if missing:
            raise k.fail(missing[0], f"is missing while {keys[present[0]]} is set (a preset needs all four fields)")
        values: dict[str, float] = {}
        for f in ("threshold", "editing_threshold", "max_post_steps"):
            v = k.number(keys[f], integer=f == "max_post_steps")
            assert v is not None  # present, checked above
            domain = DOMAINS[f]  # the option's own domain: a preset must be a value the user could pass
            if domain.problem(int(v) if f == "max_post_steps" else v):
                raise k.fail(keys[f], f"is {_num(v)}, must be {domain.describe()} (the domain of {domain.flag})")
            values[f] = v
        indel = k.boolean(K.preset_key(mode, "indel"), False)
        if indel and version != "2.2":
            raise k.fail(K.preset_key(mode, "indel"), f"is true, but only LLaDA2.2 inserts and deletes "
                                                      f"(this file is LLaDA{version})")
        out[mode] = Preset(values["threshold"], values["editing_threshold"], int(values["max_post_steps"]),
                           k.boolean(keys["editing"], False), indel)
    if out and len(out) != len(MODES):
        mode = next(m for m in MODES if m not in out)
        raise k.fail(K.preset_key(mode, "threshold"), "is missing (the file has presets for other modes)")
    return out or None


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else str(v)


def _template(k: _Keys) -> str | None:
    src = k.string(K.CHAT_TEMPLATE)
    if src is not None and len(src) > MAX_TEMPLATE_CHARS:
        raise k.fail(K.CHAT_TEMPLATE, f"is {len(src)} characters long (at most {MAX_TEMPLATE_CHARS})")
    return src


def expected_tensors(hp: dict[str, int]) -> dict[str, tuple[int, ...]]:
    """GGUF tensor name -> ggml shape (``ne``, innermost first) that ``load_arch_tensors`` creates."""
    e, v, d = hp["n_embd"], hp["n_vocab"], hp["head_dim"]
    gqa = d * hp["n_head_kv"]
    out = {"token_embd.weight": (e, v), "output_norm.weight": (e,), "output.weight": (e, v)}
    for i in range(hp["n_layer"]):
        b = f"blk.{i}."
        out |= {b + "attn_norm.weight": (e,), b + "attn_qkv.weight": (e, e + 2 * gqa),
                b + "attn_output.weight": (d * hp["n_head"], e), b + "attn_q_norm.weight": (d,),
                b + "attn_k_norm.weight": (d,), b + "ffn_norm.weight": (e,)}
        if i < hp["n_dense"]:
            f = hp["n_ff"]
            out |= {b + "ffn_gate.weight": (e, f), b + "ffn_down.weight": (f, e), b + "ffn_up.weight": (e, f)}
        else:
            x, m, s = hp["n_expert"], hp["n_ff_exp"], hp["n_ff_shexp"]
            out |= {b + "ffn_gate_inp.weight": (e, x), b + "exp_probs_b.bias": (x,),
                    b + "ffn_gate_exps.weight": (e, m, x), b + "ffn_down_exps.weight": (m, e, x),
                    b + "ffn_up_exps.weight": (e, m, x), b + "ffn_gate_shexp.weight": (e, s),
                    b + "ffn_down_shexp.weight": (s, e), b + "ffn_up_shexp.weight": (e, s)}
    return out


def _tensors(reader: GGUFReader, path: Path, hp: dict[str, int]) -> None:
    """Every tensor the graph uses is present with the shape the hyper-parameters imply, and nothing else."""
    want = expected_tensors(hp)
    have = {t.name: t for t in reader.tensors}
    fix = "the file does not match its metadata; re-convert it with `dllm convert`"
    for name, shape in want.items():
        t = have.get(name)
        if t is None:
            if name.endswith("exp_probs_b.bias"):  # optional in llama.cpp
                continue
            raise ModelError(f"{path}: tensor {name} is missing", fix)
        got = tuple(int(n) for n in t.shape)
        if got != shape:
            raise ModelError(f"{path}: tensor {name} has shape {list(got)}, the metadata implies {list(shape)}", fix)
        qtype = GGMLQuantizationType(t.tensor_type)
        if qtype in _BAD_TENSOR_TYPES or (len(shape) == 1 and qtype != GGMLQuantizationType.F32):
            raise ModelError(f"{path}: tensor {name} has type {qtype.name}"
                             f"{' (1-D tensors must be F32)' if len(shape) == 1 else ''}", fix)
        if shape[0] % GGML_QUANT_SIZES[qtype][0]:
            raise ModelError(f"{path}: tensor {name} rows of {shape[0]} are not whole {qtype.name} blocks", fix)
    extra = sorted(set(have) - set(want))
    if extra:
        raise ModelError(f"{path}: unexpected tensor {extra[0]}", fix)
