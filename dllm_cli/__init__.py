"""dllm: local inference of LLaDA2.x diffusion language models.

Pipeline: ``converters`` (HF -> GGUF) -> ``dllm_cli.runtime`` (patched llama.cpp) ->
``dllm_cli.decoding`` (block diffusion policies, typed step events) -> ``dllm_cli.cli`` (front ends).

Public API (imported lazily so the CLI starts fast)::

    from dllm_cli import load, decode_config, prompt_ids, stream_generate, generate, convert, run_benchmark
"""
from __future__ import annotations

from importlib import import_module
TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (mypy reads the name)

if TYPE_CHECKING:  # typing.Any is not imported at run time: the console script starts here (cli/entry.py)
    from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "load": "dllm_cli.generate", "decode_config": "dllm_cli.generate", "prompt_ids": "dllm_cli.generate",
    "stream_generate": "dllm_cli.generate", "generate": "dllm_cli.generate",
    "convert": "converters", "run_benchmark": "dllm_cli.bench",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dllm_cli' has no attribute {name!r}")
