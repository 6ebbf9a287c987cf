"""dllm: local inference of LLaDA2.x diffusion language models.

Pipeline: ``converters`` (HF -> GGUF) -> ``dllm_cli.runtime`` (patched llama.cpp) ->
``dllm_cli.decoding`` (block diffusion policies, typed step events) -> ``dllm_cli.cli`` (front ends).
"""
from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
