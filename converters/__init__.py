"""Hugging Face safetensors checkpoints -> GGUF files the patched llama.cpp runtime loads.

``convert("inclusionAI/LLaDA2.1-mini", "mini.gguf", outtype="q8_0")`` resolves the source (directory,
repo id through the HF cache, or models.toml alias), validates config, tensors and tokenizer before the
first byte is written, then streams the GGUF to its own temporary ``.OUT.XXXXXXXX.part`` and renames it on success.
"""
from __future__ import annotations

import re
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from gguf import GGUFValueType, GGUFWriter, TokenType

from converters import llada2 as _llada2  # noqa: F401  (registers LLaDA2MoeModelLM)
from converters.base import (AtomicOutput, OutType, Progress, ProgressFn, Source, architecture_class,
                             file_type_of, open_checkpoint, read_json, resolve_source, supported_architectures,
                             write_gguf)
from converters.vocab import load_vocab, write_vocab
from dllm_cli import __version__, gguf_keys as K, registry
from dllm_cli.errors import ConvertError, UsageError

DEFAULT_VERSION = "2.1"
MODEL_VERSIONS = ("2.0", "2.1", "2.2")
_VERSION_IN_NAME = re.compile(r"2\.([01])(?!\d)")
_V22_IN_NAME = re.compile(r"2\.2(?!\d)")


@dataclass(frozen=True)
class ConvertResult:
    """What ``convert`` wrote."""

    path: Path
    outtype: str
    model_version: str
    source: str
    revision: str
    tensors: int
    bytes: int
    seconds: float


def default_output(name: str, outtype: OutType) -> Path:
    """``$DLLM_HOME/models/<alias-or-dirname>-<outtype>.gguf``."""
    return registry.models_dir() / f"{name}-{outtype.value}.gguf"


def resolve_version(flag: str | None, source: Source, config: dict) -> tuple[str, bool]:
    """flag > registry alias > "2.0"/"2.1" in repo id, dir name or ``_name_or_path`` > default.

    Returns (version, guessed); ``guessed`` is True when the default was used. LLaDA2.2 is told by its
    config keys (block routing, edit-control ids; docs/LLADA22.md), never by a name alone.
    """
    v22 = _llada2.is_llada22(config)
    if v22 or flag == "2.2" or source.version == "2.2":
        if not v22:
            raise UsageError(f"--model-version 2.2: {source.origin} is not a LLaDA2.2 checkpoint: config.json has none of "
                             f"{', '.join(_llada2.LLADA22_KEYS)}",
                             "LLaDA2.2 configs carry expert_capacity/block_size and delete/split token ids")
        if flag and flag != "2.2":
            raise UsageError(f"{source.origin} is a LLaDA2.2 checkpoint (config.json has block routing keys); "
                             f"--model-version {flag} does not fit it", "drop --model-version or pass 2.2")
        return "2.2", False
    if flag:
        if flag not in MODEL_VERSIONS:
            raise UsageError(f"unknown model version {flag!r}", f"use one of {', '.join(MODEL_VERSIONS)}")
        return flag, False
    if source.version:
        return source.version, False
    names = [source.origin if "/" in source.origin and not Path(source.origin).is_absolute() else "",
             source.directory.name, str(config.get("_name_or_path") or "")]
    for n in names:
        m = _VERSION_IN_NAME.search(n)
        if m:
            return f"2.{m.group(1)}", False
        if _V22_IN_NAME.search(n):
            raise ConvertError(f"{source.origin} is named LLaDA2.2 but config.json lacks 'expert_capacity' (expected "
                               f"the block-routing pool size, 48 in LLaDA2.2)",
                               "use the config.json shipped with the checkpoint (see docs/LLADA22.md)")
    return DEFAULT_VERSION, True


def convert(source: str | Path, output: str | Path | None = None, *, outtype: str | OutType = OutType.BF16,
            revision: str | None = None, model_version: str | None = None, force: bool = False,
            progress: ProgressFn | None = None, warn: Callable[[str], None] | None = None) -> ConvertResult:
    """Convert an HF LLaDA2.x checkpoint to GGUF.

    ``source``: checkpoint directory, repo id (``org/name``, fetched into the HF cache honouring HF_HOME,
    HF_HUB_CACHE and HF_HUB_OFFLINE) or models.toml alias. ``output`` defaults to
    ``$DLLM_HOME/models/<name>-<outtype>.gguf``. ``outtype``: f32, f16, bf16 or q8_0 (norms, 1-D tensors
    and the router stay F32). ``model_version`` ("2.0"/"2.1") selects the decode presets stored in the
    file; without it the registry or the model name decides, else "2.1" with a warning. An existing
    output is refused unless ``force``. ``progress`` gets a ``Progress`` after every tensor.
    Raises ``ConvertError`` (bad input, I/O) or ``UsageError`` (bad arguments); never leaves a partial file.
    """
    try:
        otype = OutType(outtype)
    except ValueError:
        raise UsageError(f"unknown output type {outtype!r}", f"use one of {', '.join(t.value for t in OutType)}") from None
    if model_version is not None and model_version not in MODEL_VERSIONS:
        raise UsageError(f"unknown model version {model_version!r}", f"use one of {', '.join(MODEL_VERSIONS)}")
    warn = warn or (lambda msg: warnings.warn(msg, stacklevel=3))
    start = time.monotonic()

    def target(name: str) -> AtomicOutput:
        return AtomicOutput(Path(output) if output is not None else default_output(name, otype), force)

    src = resolve_source(source, revision, before_download=lambda name: target(name).check())
    atomic = target(src.name)
    atomic.check()

    config = read_json(src.directory / "config.json", "config.json",
                       "point at a Hugging Face checkpoint directory (config.json + *.safetensors)")
    arch_cls = architecture_class(config)
    ckpt = open_checkpoint(src.directory, warn)
    arch = arch_cls(config, ckpt)
    plans = arch.plan(otype)
    vocab = load_vocab(src.directory, arch.hp.vocab, config.get("pad_token_id"))
    version, guessed = resolve_version(model_version, src, config)
    if guessed:
        warn(f"cannot tell the LLaDA2 version of {src.origin}; assuming {version} "
             f"(pass --model-version 2.0 for LLaDA2.0 checkpoints)")
    presets = registry.version_presets(version)
    unused = {i for i, t in enumerate(vocab.types) if t == int(TokenType.UNUSED)}
    edit_ids = _llada2.edit_token_ids(config, vocab.tokens, unused) if version == "2.2" else None

    def write_kv(w: GGUFWriter) -> None:
        w.add_name(src.name)
        w.add_file_type(file_type_of(otype))
        w.add_quantization_version(2)  # GGML_QNT_VERSION
        arch.write_kv(w)
        w.add_string(K.MODEL_VERSION, version)
        for mode, preset in presets.items():
            w.add_float32(K.preset_key(mode, "threshold"), preset.threshold)
            w.add_float32(K.preset_key(mode, "editing_threshold"), preset.editing_threshold)
            w.add_uint32(K.preset_key(mode, "max_post_steps"), preset.max_post_steps)
            w.add_bool(K.preset_key(mode, "editing"), preset.editing)
        w.add_string(K.SOURCE, src.origin)
        # add_string drops empty values; "" (a local directory, revision unknown) is still provenance
        w.add_key_value(K.REVISION, src.revision, GGUFValueType.STRING)
        w.add_string(K.DLLM_VERSION, __version__)
        write_vocab(w, vocab)
        if edit_ids is not None:  # LLaDA2.2 only, after every key a 2.0/2.1 file has (their bytes stay the same)
            w.add_uint32(K.DELETE_ID, edit_ids[0])
            w.add_uint32(K.SPLIT_ID, edit_ids[1])
            for mode, preset in presets.items():  # the Levenshtein decoder's switch (absent: an older 2.2 file)
                w.add_bool(K.preset_key(mode, "indel"), preset.indel)
            stops = [vocab.eos_id] + ([vocab.eot_id] if vocab.eot_id is not None else [])
            w.add_array(K.STOP_IDS, stops)

    atomic.check(need_bytes=sum(p.nbytes for p in plans))  # before the first byte: room for the tensors
    with atomic as part:
        nbytes = write_gguf(part, K.ARCH, write_kv, ckpt, plans, progress)
    return ConvertResult(atomic.out, otype.value, version, src.origin, src.revision, len(plans), nbytes,
                         time.monotonic() - start)


__all__ = ["convert", "ConvertResult", "OutType", "Progress", "MODEL_VERSIONS", "supported_architectures",
           "default_output", "ConvertError"]
