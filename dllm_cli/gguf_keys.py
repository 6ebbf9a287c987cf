"""GGUF names shared by the converter, the runtime, the reference model and the decoder.

Upstream key names are reused where llama.cpp has them (``{arch}.attention.causal``,
``tokenizer.ggml.mask_token_id``); the ``llada2.diffusion.*`` and ``dllm.*`` keys are ours.
"""
from __future__ import annotations

ARCH = "llada2"
PRE_TOKENIZER = "bailingmoe2"

# hyper-parameters, written with the ``llada2.`` prefix (same suffixes as llama.cpp's bailingmoe2)
CONTEXT_LENGTH = f"{ARCH}.context_length"
EMBEDDING_LENGTH = f"{ARCH}.embedding_length"
BLOCK_COUNT = f"{ARCH}.block_count"
FEED_FORWARD_LENGTH = f"{ARCH}.feed_forward_length"
HEAD_COUNT = f"{ARCH}.attention.head_count"
HEAD_COUNT_KV = f"{ARCH}.attention.head_count_kv"
KEY_LENGTH = f"{ARCH}.attention.key_length"
VALUE_LENGTH = f"{ARCH}.attention.value_length"
RMS_EPS = f"{ARCH}.attention.layer_norm_rms_epsilon"
CAUSAL = f"{ARCH}.attention.causal"
ROPE_FREQ_BASE = f"{ARCH}.rope.freq_base"
ROPE_DIM = f"{ARCH}.rope.dimension_count"
VOCAB_SIZE = f"{ARCH}.vocab_size"
LEADING_DENSE = f"{ARCH}.leading_dense_block_count"
EXPERT_COUNT = f"{ARCH}.expert_count"
EXPERT_USED = f"{ARCH}.expert_used_count"
EXPERT_SHARED_COUNT = f"{ARCH}.expert_shared_count"
EXPERT_FFN = f"{ARCH}.expert_feed_forward_length"
EXPERT_SHARED_FFN = f"{ARCH}.expert_shared_feed_forward_length"
EXPERT_GATING = f"{ARCH}.expert_gating_func"
EXPERT_SCALE = f"{ARCH}.expert_weights_scale"
EXPERT_NORM = f"{ARCH}.expert_weights_norm"
EXPERT_GROUPS = f"{ARCH}.expert_group_count"
EXPERT_GROUPS_USED = f"{ARCH}.expert_group_used_count"
NEXTN_LAYERS = f"{ARCH}.nextn_predict_layers"
# LLaDA2.2 block routing (ours; docs/LLADA22.md): per routing block of EXPERT_BLOCK_SIZE tokens, the pool of the
# EXPERT_BLOCK_CAPACITY experts with the highest max-over-tokens score; then per-token top-k inside the pool.
EXPERT_BLOCK_CAPACITY = f"{ARCH}.expert_block_capacity"
EXPERT_BLOCK_SIZE = f"{ARCH}.expert_block_size"
EXPERT_BLOCK_SCORE = f"{ARCH}.expert_block_score"  # which score is pooled; only BLOCK_SCORE_BIASED exists
BLOCK_SCORE_BIASED = "sigmoid+bias"

GATING_SIGMOID = 2  # llama.cpp LLAMA_EXPERT_GATING_FUNC_TYPE_SIGMOID

# diffusion metadata (ours, except shift_logits which llama.cpp's LLaDA converters also write)
BLOCK_LENGTH = f"{ARCH}.diffusion.block_length"
SHIFT_LOGITS = f"{ARCH}.diffusion.shift_logits"
MODEL_VERSION = "dllm.model_version"  # "2.0" | "2.1" | "2.2"
# LLaDA2.2 edit-control tokens (ids from config.json, checked against tokenizer.json) and its stop set
DELETE_ID = f"{ARCH}.diffusion.delete_token_id"
SPLIT_ID = f"{ARCH}.diffusion.split_token_id"
STOP_IDS = f"{ARCH}.diffusion.stop_token_ids"
PRESET_PREFIX = "dllm.preset"  # dllm.preset.{speed,quality}.{threshold,editing_threshold,max_post_steps,editing}
PRESET_FIELDS = ("threshold", "editing_threshold", "max_post_steps", "editing")  # every file has these
# and 2.2 files also dllm.preset.<mode>.indel (DELETE/INSERT edits on/off)
SOURCE = "dllm.source"
REVISION = "dllm.revision"
DLLM_VERSION = "dllm.version"

# tokenizer
MASK_ID = "tokenizer.ggml.mask_token_id"
EOS_ID = "tokenizer.ggml.eos_token_id"
BOS_ID = "tokenizer.ggml.bos_token_id"
PAD_ID = "tokenizer.ggml.padding_token_id"
EOT_ID = "tokenizer.ggml.eot_token_id"
CHAT_TEMPLATE = "tokenizer.chat_template"


def preset_key(mode: str, field: str) -> str:
    """``dllm.preset.<mode>.<field>``."""
    return f"{PRESET_PREFIX}.{mode}.{field}"
