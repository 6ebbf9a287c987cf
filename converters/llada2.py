"""LLaDA2.x (``LLaDA2MoeModelLM``): config -> GGUF hyper-parameters, HF tensors -> llama.cpp bailingmoe2 names.

Every value comes from config.json (the HF config class defaults are not the model's, spec §1.2); every
source tensor must be mapped and every expected tensor present with its shape (spec §2, §2.1).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

from gguf import GGUFWriter

from converters.base import OutType, TensorPlan, register, tensor_qtype
from converters.safetensors import Checkpoint
from dllm_cli import gguf_keys as K
from dllm_cli.errors import ConvertError

BLOCK_LENGTH = 32  # the SFT / inference block size of every released LLaDA2.x (spec §3.4)

# HF suffix under ``model.layers.{i}.`` -> GGUF name under ``blk.{i}.`` (plain 1:1 tensors)
LAYER_MAP = {
    "input_layernorm.weight": "attn_norm.weight",
    "attention.query_key_value.weight": "attn_qkv.weight",  # fused, rows Q|K|V, no permute (NeoX RoPE)
    "attention.query_layernorm.weight": "attn_q_norm.weight",
    "attention.key_layernorm.weight": "attn_k_norm.weight",
    "attention.dense.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "mlp.gate.weight": "ffn_gate_inp.weight",
    "mlp.gate.expert_bias": "exp_probs_b.bias",
    "mlp.shared_experts.gate_proj.weight": "ffn_gate_shexp.weight",
    "mlp.shared_experts.up_proj.weight": "ffn_up_shexp.weight",
    "mlp.shared_experts.down_proj.weight": "ffn_down_shexp.weight",
}
# routed experts ``mlp.experts.{e}.<proj>`` are stacked over e into one tensor
EXPERT_MAP = {"gate_proj.weight": "ffn_gate_exps.weight", "up_proj.weight": "ffn_up_exps.weight",
              "down_proj.weight": "ffn_down_exps.weight"}
GLOBAL_MAP = {"model.word_embeddings.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
              "lm_head.weight": "output.weight"}
# the router must select experts exactly as trained: keep it (and its bias) F32 like the norms
KEEP_F32 = ("_norm.weight", "ffn_gate_inp.weight", "exp_probs_b.bias")

_INT_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
             "intermediate_size", "moe_intermediate_size", "num_experts", "num_experts_per_tok",
             "num_shared_experts", "n_group", "topk_group", "first_k_dense_replace", "max_position_embeddings")
_FLOAT_KEYS = ("routed_scaling_factor", "rms_norm_eps", "rope_theta", "partial_rotary_factor")


@dataclass(frozen=True)
class HParams:
    """The config.json values the GGUF needs, validated."""

    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    moe_ffn: int
    experts: int
    experts_used: int
    shared: int
    groups: int
    groups_used: int
    dense_layers: int
    context: int
    scale: float
    eps: float
    rope_theta: float
    rope_dim: int
    norm_topk: bool
    capacity: int = 0  # LLaDA2.2 block routing: experts admitted per routing block (0 = per-token routing)
    routing_block: int = 0  # tokens per routing block

    @classmethod
    def from_config(cls, cfg: dict) -> "HParams":
        def get(key: str, kind: type) -> int | float:
            if key not in cfg or cfg[key] is None:
                raise ConvertError(f"config.json is missing required key {key!r}",
                                   "use the config.json shipped with the checkpoint")
            v = cfg[key]
            ok = isinstance(v, bool) if kind is bool else (
                isinstance(v, int) and not isinstance(v, bool) and abs(v) < 2**63 or
                isinstance(v, float) and math.isfinite(v) and (kind is float or v.is_integer()))
            if not ok:
                want = "a finite number" if kind is float else kind.__name__
                raise ConvertError(f"config.json key {key!r} must be {want}, got {v!r}",
                                   "use the config.json shipped with the checkpoint")
            return kind(v)

        ints = {k: int(get(k, int)) for k in _INT_KEYS}
        flts = {k: float(get(k, float)) for k in _FLOAT_KEYS}
        _check_supported(cfg)
        _check_ranges(ints, flts)
        head_dim = int(get("head_dim", int)) if cfg.get("head_dim") is not None else (
            ints["hidden_size"] // ints["num_attention_heads"])
        hp = cls(vocab=ints["vocab_size"], hidden=ints["hidden_size"], layers=ints["num_hidden_layers"],
                 heads=ints["num_attention_heads"], kv_heads=ints["num_key_value_heads"], head_dim=head_dim,
                 ffn=ints["intermediate_size"], moe_ffn=ints["moe_intermediate_size"], experts=ints["num_experts"],
                 experts_used=ints["num_experts_per_tok"], shared=ints["num_shared_experts"],
                 groups=ints["n_group"], groups_used=ints["topk_group"],
                 dense_layers=ints["first_k_dense_replace"], context=ints["max_position_embeddings"],
                 scale=flts["routed_scaling_factor"], eps=flts["rms_norm_eps"], rope_theta=flts["rope_theta"],
                 rope_dim=int(head_dim * flts["partial_rotary_factor"]), norm_topk=bool(get("norm_topk_prob", bool)),
                 **block_routing(cfg, ints["num_experts"], ints["num_experts_per_tok"]))
        hp._validate()
        return hp

    def _validate(self) -> None:
        """The relations the runtime's loader and graph assert on (``dllm_cli/runtime/hparams.py``)."""
        per_group = self.experts // self.groups
        bad = [
            (self.heads % self.kv_heads == 0, "num_attention_heads must be a multiple of num_key_value_heads"),
            (self.head_dim >= 1, "head_dim must be positive"),
            (self.heads * self.head_dim == self.hidden,  # the runtime's graph (and hparams.py) require it
             f"num_attention_heads x head_dim ({self.heads} x {self.head_dim}) must equal hidden_size "
             f"({self.hidden})"),
            (self.experts % self.groups == 0, "num_experts must be a multiple of n_group"),
            (self.groups == 1 or per_group >= 2, "n_group must leave at least 2 experts per group"),
            (1 <= self.groups_used <= self.groups, "topk_group must be in 1..n_group"),
            (1 <= self.experts_used <= self.experts, "num_experts_per_tok must be in 1..num_experts"),
            (self.experts_used <= self.groups_used * per_group,
             "num_experts_per_tok must not exceed the experts of topk_group groups"),
            (0 <= self.dense_layers <= self.layers, "first_k_dense_replace must be in 0..num_hidden_layers"),
            (self.dense_layers == 0 or self.ffn >= 1, "intermediate_size must be positive with dense layers"),
            (0 < self.rope_dim <= self.head_dim and self.rope_dim % 2 == 0,
             "head_dim * partial_rotary_factor must be an even number of dims in 1..head_dim"),
        ]
        for ok, msg in bad:
            if not ok:
                raise ConvertError(f"config.json is inconsistent: {msg}", "use the config.json shipped with the checkpoint")

    @property
    def written_groups(self) -> tuple[int, int]:
        """(expert_group_count, expert_group_used_count) for the GGUF. Selecting every group is no group
        limit at all, and llama.cpp asserts used < count, so that case is written as no groups (0, 0)."""
        return (self.groups, self.groups_used) if self.groups == 1 or self.groups_used < self.groups else (0, 0)


_LIMITS = {  # config key -> (least, most) accepted value (llama.cpp: at most 512 layers, 1024 experts)
    "vocab_size": (1, 2**31 - 1), "hidden_size": (1, 1 << 20), "num_hidden_layers": (1, 512),
    "num_attention_heads": (1, 1 << 16), "num_key_value_heads": (1, 1 << 16), "intermediate_size": (0, 1 << 24),
    "moe_intermediate_size": (1, 1 << 24), "num_experts": (1, 1024), "num_experts_per_tok": (1, 1024),
    "num_shared_experts": (1, 1024), "n_group": (1, 1024), "topk_group": (1, 1024),
    "first_k_dense_replace": (0, 512), "max_position_embeddings": (1, 2**31 - 1),
}


def _check_ranges(ints: dict[str, int], flts: dict[str, float]) -> None:
    for key, (lo, hi) in _LIMITS.items():
        if not lo <= ints[key] <= hi:
            raise ConvertError(f"config.json key {key!r} is {ints[key]}, must be in {lo}..{hi}",
                               "use the config.json shipped with the checkpoint")
    # each is stored as a float32: beyond its range it cannot even be written (1e300), and an epsilon below its
    # normal range rounds to 0 or a denormal the norm cannot use (1e-300)
    for key, ok, want in (("rms_norm_eps", 1e-30 <= flts["rms_norm_eps"] <= 1.0, "in [1e-30, 1]"),
                          ("rope_theta", 0 < flts["rope_theta"] <= 1e12, "in (0, 1e12]"),
                          ("routed_scaling_factor", 0 <= flts["routed_scaling_factor"] <= 1e6, "in [0, 1e6]"),
                          ("partial_rotary_factor", 0 < flts["partial_rotary_factor"] <= 1, "in (0, 1]")):
        if not ok:
            raise ConvertError(f"config.json key {key!r} is {flts[key]}, must be {want}",
                               "use the config.json shipped with the checkpoint")


# config.json keys that only LLaDA2.2 checkpoints have (docs/LLADA22.md)
LLADA22_KEYS = ("expert_capacity", "delete_token_id", "split_token_id")


def is_llada22(cfg: dict) -> bool:
    """A LLaDA2.2 config: any of the block-routing / edit-control keys is present."""
    return any(k in cfg for k in LLADA22_KEYS)


def _need_int(cfg: dict, key: str, expected: str) -> int:
    v = cfg.get(key)
    if isinstance(v, bool) or not isinstance(v, int) and not (isinstance(v, float) and v.is_integer()):
        got = "it is missing" if key not in cfg else f"got {v!r}"
        raise ConvertError(f"LLaDA2.2 config.json key {key!r}: expected {expected}, {got}",
                           "use the config.json shipped with the checkpoint (see docs/LLADA22.md)")
    return int(v)


def block_routing(cfg: dict, n_expert: int, n_used: int) -> dict[str, int]:
    """``capacity`` and ``routing_block`` of a LLaDA2.2 config (both 0 otherwise); unconfirmed shapes refuse."""
    if not is_llada22(cfg):
        return {}
    cap = _need_int(cfg, "expert_capacity", f"the number of experts admitted per routing block "
                                            f"(48 in LLaDA2.2), between num_experts_per_tok={n_used} and num_experts={n_expert}")
    if not n_used <= cap <= n_expert:
        raise ConvertError(f"LLaDA2.2 config.json key 'expert_capacity'={cap}: expected a value between "
                           f"num_experts_per_tok={n_used} and num_experts={n_expert}")
    blk = _need_int(cfg, "block_size", f"the routing block length in tokens, a divisor of {BLOCK_LENGTH} (32 in LLaDA2.2)")
    if blk < 1 or BLOCK_LENGTH % blk:
        raise ConvertError(f"LLaDA2.2 config.json key 'block_size'={blk}: expected a divisor of dllm's decode block "
                           f"length {BLOCK_LENGTH} (32 in LLaDA2.2)")
    return {"capacity": cap, "routing_block": blk}


def edit_token_ids(cfg: dict, tokens: list[str], unused: set[int]) -> tuple[int, int]:
    """DELETE and SPLIT ids of a LLaDA2.2 config, each required to name a real token of tokenizer.json."""
    out = []
    for key, role in (("delete_token_id", "DELETE"), ("split_token_id", "SPLIT/INSERT")):
        i = _need_int(cfg, key, f"the id of the {role} edit-control token (156930/156931 in LLaDA2.2-flash)")
        if not 0 <= i < len(tokens) or i in unused:
            raise ConvertError(f"LLaDA2.2 config.json key {key!r}={i}: expected the id of a token defined in "
                               f"tokenizer.json (the {role} edit-control token), but tokenizer.json has none there",
                               "the tokenizer and config.json belong to different models")
        out.append(i)
    return out[0], out[1]


def _check_supported(cfg: dict) -> None:
    """Variants the runtime does not implement are refused rather than converted into a wrong model."""
    wrong = []
    if cfg.get("score_function", "sigmoid") != "sigmoid":
        wrong.append(f"score_function={cfg['score_function']!r} (only sigmoid routing)")
    for key, want in (("use_qkv_bias", False), ("use_bias", False), ("use_qk_norm", True),
                      ("tie_word_embeddings", False), ("moe_router_enable_expert_bias", True)):
        if key in cfg and bool(cfg[key]) != want:
            wrong.append(f"{key}={cfg[key]!r}")
    if cfg.get("rope_scaling"):
        wrong.append("rope_scaling (only plain RoPE)")
    if cfg.get("num_nextn_predict_layers"):
        wrong.append("num_nextn_predict_layers (no MTP layers)")
    if wrong:
        raise ConvertError(f"unsupported LLaDA2 variant: {', '.join(wrong)}",
                           "only the released LLaDA2.0/2.1 layout is supported")


@register("LLaDA2MoeModelLM")
class LLaDA2:
    """Maps one LLaDA2.x checkpoint onto the ``llada2`` GGUF architecture."""

    def __init__(self, config: dict, ckpt: Checkpoint) -> None:
        self.config = config
        self.hp = HParams.from_config(config)
        self.ckpt = ckpt

    def expected(self) -> dict[str, tuple[tuple[int, ...], tuple[str, ...]]]:
        """GGUF name -> (numpy shape, HF source names stacked in order); spec §2.1."""
        hp = self.hp
        h, d, m = hp.hidden, hp.head_dim, hp.moe_ffn
        s = m * hp.shared
        out: dict[str, tuple[tuple[int, ...], tuple[str, ...]]] = {}
        rev = {v: k for k, v in LAYER_MAP.items()}

        def one(gguf: str, shape: tuple[int, ...], hf: str) -> None:
            out[gguf] = (shape, (hf,))

        one("token_embd.weight", (hp.vocab, h), "model.word_embeddings.weight")
        for i in range(hp.layers):
            b, p = f"blk.{i}.", f"model.layers.{i}."
            shapes = {"attn_norm.weight": (h,), "attn_qkv.weight": ((hp.heads + 2 * hp.kv_heads) * d, h),
                      "attn_q_norm.weight": (d,), "attn_k_norm.weight": (d,), "attn_output.weight": (h, hp.heads * d),
                      "ffn_norm.weight": (h,)}
            if i < hp.dense_layers:
                shapes |= {"ffn_gate.weight": (hp.ffn, h), "ffn_up.weight": (hp.ffn, h), "ffn_down.weight": (h, hp.ffn)}
            else:
                shapes |= {"ffn_gate_inp.weight": (hp.experts, h), "exp_probs_b.bias": (hp.experts,),
                           "ffn_gate_shexp.weight": (s, h), "ffn_up_shexp.weight": (s, h), "ffn_down_shexp.weight": (h, s)}
                exp_shapes = {"gate_proj.weight": (m, h), "up_proj.weight": (m, h), "down_proj.weight": (h, m)}
                for proj, g in EXPERT_MAP.items():
                    parts = tuple(f"{p}mlp.experts.{e}.{proj}" for e in range(hp.experts))
                    out[b + g] = ((hp.experts, *exp_shapes[proj]), parts)
            for g, shape in shapes.items():
                one(b + g, shape, p + rev[g])
        one("output_norm.weight", (h,), "model.norm.weight")
        one("output.weight", (hp.vocab, h), "lm_head.weight")
        return out

    def plan(self, outtype: OutType) -> list[TensorPlan]:
        """Check every source tensor against the expected set and return the write plan (GGUF order)."""
        expected = self.expected()
        wanted: dict[str, tuple[str, tuple[int, ...]]] = {}  # HF name -> (GGUF name, expected source shape)
        for g, (shape, parts) in expected.items():
            for hf in parts:
                wanted[hf] = (g, shape[1:] if len(parts) > 1 else shape)
        have = set(self.ckpt.names())
        extra = sorted(have - set(wanted), key=_natural)
        if extra:
            raise ConvertError(f"unmapped tensor {extra[0]} in the checkpoint"
                               + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""),
                               "the checkpoint does not match config.json or is not a LLaDA2 model")
        missing = sorted(set(wanted) - have, key=_natural)
        if missing:
            raise ConvertError(f"missing tensor {missing[0]} (for {wanted[missing[0]][0]})"
                               + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""),
                               "the checkpoint is incomplete; re-download it")
        for hf, (g, shape) in sorted(wanted.items(), key=lambda kv: _natural(kv[0])):
            got = tuple(self.ckpt.shape(hf))
            if got != shape:
                raise ConvertError(f"tensor {hf} has shape {list(got)}, expected {list(shape)} from config.json",
                                   "the checkpoint does not match its config.json")
            dtype = self.ckpt.where[hf].dtype(hf)
            if dtype not in ("F32", "F16", "BF16"):
                raise ConvertError(f"tensor {hf} has dtype {dtype}; only F32/F16/BF16 checkpoints are supported",
                                   "convert from the original bf16 checkpoint")
        return [TensorPlan(g, shape, tensor_qtype(shape, outtype, g.endswith(KEEP_F32)), parts)
                for g, (shape, parts) in expected.items()]

    def write_kv(self, writer: GGUFWriter) -> None:
        """The ``llada2.*`` hyper-parameters (names from gguf_keys; llama.cpp bailingmoe2 semantics)."""
        hp = self.hp
        u32 = {K.CONTEXT_LENGTH: hp.context, K.EMBEDDING_LENGTH: hp.hidden, K.BLOCK_COUNT: hp.layers,
               K.FEED_FORWARD_LENGTH: hp.ffn, K.HEAD_COUNT: hp.heads, K.HEAD_COUNT_KV: hp.kv_heads,
               K.KEY_LENGTH: hp.head_dim, K.VALUE_LENGTH: hp.head_dim, K.ROPE_DIM: hp.rope_dim,
               K.VOCAB_SIZE: hp.vocab, K.LEADING_DENSE: hp.dense_layers, K.EXPERT_COUNT: hp.experts,
               K.EXPERT_USED: hp.experts_used, K.EXPERT_SHARED_COUNT: hp.shared, K.EXPERT_FFN: hp.moe_ffn,
               K.EXPERT_SHARED_FFN: hp.moe_ffn, K.EXPERT_GATING: K.GATING_SIGMOID,
               K.EXPERT_GROUPS: hp.written_groups[0], K.EXPERT_GROUPS_USED: hp.written_groups[1], K.NEXTN_LAYERS: 0,
               K.BLOCK_LENGTH: BLOCK_LENGTH}
        # EXPERT_SHARED_FFN is per shared expert: llama.cpp's loader multiplies it by EXPERT_SHARED_COUNT
        for key, val in u32.items():
            writer.add_uint32(key, val)
        for key, fval in {K.RMS_EPS: hp.eps, K.ROPE_FREQ_BASE: hp.rope_theta, K.EXPERT_SCALE: hp.scale}.items():
            writer.add_float32(key, fval)
        writer.add_bool(K.EXPERT_NORM, hp.norm_topk)
        writer.add_bool(K.CAUSAL, False)
        writer.add_bool(K.SHIFT_LOGITS, False)
        if hp.capacity:  # LLaDA2.2 only: 2.0/2.1 files keep exactly the keys above
            writer.add_uint32(K.EXPERT_BLOCK_CAPACITY, hp.capacity)
            writer.add_uint32(K.EXPERT_BLOCK_SIZE, hp.routing_block)
            writer.add_string(K.EXPERT_BLOCK_SCORE, K.BLOCK_SCORE_BIASED)


def _natural(name: str) -> tuple:
    """Sort ``layers.10`` after ``layers.9`` so the first reported tensor is the first in the model."""
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name))
