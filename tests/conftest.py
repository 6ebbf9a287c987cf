"""Shared fixtures: an isolated DLLM_HOME, tiny random LLaDA2 checkpoints and GGUFs built from them.

``make_checkpoint(**config_overrides)`` writes a fresh HF checkpoint directory (config.json, safetensors,
tokenizer.json, tokenizer_config.json) and returns its path; ``make_gguf(outtype="f32", **overrides)``
converts one with the real converter and returns the GGUF path.
"""
from __future__ import annotations

import itertools
import os
from pathlib import Path
from typing import Callable

import pytest

from dllm_cli.demo.checkpoint import tiny_config, write_checkpoint

_REAL_HOME = Path(os.environ.get("DLLM_HOME") or Path.home() / ".cache" / "dllm")


@pytest.fixture(autouse=True)
def dllm_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own empty ``DLLM_HOME``; the built runtime stays where it really is."""
    home = tmp_path_factory.mktemp("dllm_home")
    if not os.environ.get("DLLM_RUNTIME_DIR"):
        monkeypatch.setenv("DLLM_RUNTIME_DIR", str(_REAL_HOME / "runtime"))
    monkeypatch.setenv("DLLM_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # tests never reach the network
    return home


@pytest.fixture
def make_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Factory: ``make_checkpoint(hidden_size=32, ..., shards=2, bf16=True, seed=1, name="LLaDA2.0-x")``.

    Keyword arguments other than ``shards``, ``bf16``, ``seed``, ``name`` and ``vocab_pad`` override
    ``tiny_config``. ``name`` is the directory name (it can carry the model version, e.g. "LLaDA2.0-t").
    """
    counter = itertools.count()

    def make(*, shards: int = 1, bf16: bool = False, seed: int = 0, name: str | None = None,
             vocab_pad: int = 13, **config_overrides) -> Path:
        root = tmp_path_factory.mktemp("ckpt")
        d = root / (name or f"tiny-{next(counter)}")
        write_checkpoint(d, tiny_config(**config_overrides), seed=seed, shards=shards, bf16=bf16,
                         vocab_pad=vocab_pad)
        return d

    return make


@pytest.fixture
def make_gguf(make_checkpoint: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Factory: ``make_gguf(outtype="f32", **make_checkpoint_kwargs)`` -> path of the converted GGUF."""

    def make(outtype: str = "f32", model_version: str | None = None, **kwargs) -> Path:
        from converters import convert

        ckpt = make_checkpoint(**kwargs)
        out = tmp_path_factory.mktemp("gguf") / f"{ckpt.name}-{outtype}.gguf"
        return convert(ckpt, out, outtype=outtype, model_version=model_version).path

    return make
