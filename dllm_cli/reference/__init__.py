"""Pure-numpy LLaDA2 forward pass: the test oracle for the converter, the runtime and the decoders.

    model = load_hf(dir)                     # or load_gguf(path); float64 by default
    logits = model.forward(ids)              # [S, V], block-causal mask, row i predicts token i
    cache = model.new_cache()
    model.forward(prompt, cache=cache, commit=True)
    logits = model.forward(block, cache=cache)   # attends over [cache ‖ block]

The pure function is ``dllm_cli.reference.forward.forward`` (not re-exported: the name is its module's).
"""
from dllm_cli.reference.config import RefConfig, config_from_gguf, config_from_hf
from dllm_cli.reference.forward import (
    Route, block_causal_mask, causal_mask, expert_union, moe, rms_norm, rope_neox, route, softmax, swiglu,
)
from dllm_cli.reference.model import KVCache, RefModel
from dllm_cli.reference.weights import hf_to_weights, load_gguf, load_hf

__all__ = [
    "RefConfig", "RefModel", "KVCache", "Route", "load_hf", "load_gguf", "softmax", "route", "moe",
    "block_causal_mask", "causal_mask", "expert_union", "rms_norm", "rope_neox", "swiglu", "config_from_hf",
    "config_from_gguf", "hf_to_weights",
]
