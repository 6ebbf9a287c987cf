"""Converter plumbing shared by every architecture.

* source resolution: local directory, Hugging Face repo id (through the HF cache) or models.toml alias;
* output types (f32/f16/bf16/q8_0 through ``gguf.quants``) and the per-tensor type rules;
* streaming GGUF writing: tensor infos are planned from safetensors headers, then data is produced
  chunk by chunk (row blocks, expert by expert), so peak memory is a few tens of MB whatever the model;
* atomic output (a unique ``.OUT.XXXXXXXX.part`` renamed at the end, removed on any failure) and progress events;
* the architecture registry (``@register("LLaDA2MoeModelLM")``).
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from types import TracebackType
from typing import Callable, Iterator, Literal, Protocol, Sequence

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter, LlamaFileType
from gguf import quants

from converters.safetensors import Checkpoint, bf16_to_f32
from dllm_cli import outfiles, registry
from dllm_cli.errors import ConvertError, clip

HF_PATTERNS = ["*.json", "*.safetensors", "tokenizer*"]
CHUNK_ELEMENTS = 1 << 22  # 4M values (16 MB as f32) per conversion step bounds peak memory


class OutType(str, Enum):
    """GGUF output types produced in Python. K-quants come later through the patched llama.cpp."""

    F32 = "f32"
    F16 = "f16"
    BF16 = "bf16"
    Q8_0 = "q8_0"


_QTYPE = {OutType.F32: GGMLQuantizationType.F32, OutType.F16: GGMLQuantizationType.F16,
          OutType.BF16: GGMLQuantizationType.BF16, OutType.Q8_0: GGMLQuantizationType.Q8_0}
_FILE_TYPE = {OutType.F32: LlamaFileType.ALL_F32, OutType.F16: LlamaFileType.MOSTLY_F16,
              OutType.BF16: LlamaFileType.MOSTLY_BF16, OutType.Q8_0: LlamaFileType.MOSTLY_Q8_0}
# safetensors dtype -> the GGML type it can be copied to byte for byte
_SAME_BITS = {"F32": GGMLQuantizationType.F32, "F16": GGMLQuantizationType.F16, "BF16": GGMLQuantizationType.BF16}


def qtype_of(outtype: OutType) -> GGMLQuantizationType:
    return _QTYPE[outtype]


def file_type_of(outtype: OutType) -> int:
    return int(_FILE_TYPE[outtype])


def tensor_qtype(shape: Sequence[int], outtype: OutType, keep_f32: bool) -> GGMLQuantizationType:
    """1-D tensors and those an architecture keeps exact stay F32; quants need whole blocks per row."""
    if keep_f32 or len(shape) < 2:
        return GGMLQuantizationType.F32
    q = _QTYPE[outtype]
    block = GGML_QUANT_SIZES[q][0]
    if shape[-1] % block:
        return GGMLQuantizationType.F16  # as llama.cpp does when a row is not a whole number of blocks
    return q


def tensor_nbytes(shape: Sequence[int], qtype: GGMLQuantizationType) -> int:
    block, size = GGML_QUANT_SIZES[qtype]
    return int(np.prod(shape[:-1], dtype=np.int64)) * (shape[-1] // block) * size


# ---------------------------------------------------------------- sources


@dataclass(frozen=True)
class Source:
    """A checkpoint directory plus where it came from (for provenance and default names)."""

    directory: Path
    name: str  # alias, repo name or directory name: the stem of the default output file
    origin: str  # what the user typed, normalised: alias's repo id, repo id or absolute path
    revision: str = ""
    alias: str = ""
    version: str = ""  # the registry's model version when an alias is known


_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_source(src: str | Path, revision: str | None = None,
                   before_download: Callable[[str], None] | None = None) -> Source:
    """Turn SRC into a checkpoint directory: an existing path, a models.toml alias, or a repo id.

    ``before_download(name)`` runs before anything is fetched, so a refused output costs no download.
    """
    text = str(src)
    check = before_download or (lambda name: None)
    path = registry.as_path(text)
    if _exists(path):
        if not path.is_dir():
            raise ConvertError(f"{clip(text, 200, quote=False)} is a file, not a checkpoint directory",
                               "pass the directory that holds config.json and *.safetensors")
        return Source(path.resolve(), path.resolve().name, str(path.resolve()), _cache_revision(path.resolve()))
    specs = registry.load_registry()
    if text in specs:
        spec = specs[text]
        if not spec.repo:
            raise ConvertError(f"model {text!r} ships as a GGUF already; there is nothing to convert",
                               f"use it directly: dllm run {text}")
        check(spec.alias)
        d, rev = _download(spec.repo, revision)
        return Source(d, spec.alias, spec.repo, rev, spec.alias, spec.version)
    if _REPO_ID.match(text) and not text.startswith((".", "/", "~")):
        _check_repo_id(text)
        alias = next((s for s in specs.values() if s.repo and s.repo.lower() == text.lower()), None)
        check(alias.alias if alias else text.split("/")[1].lower())
        d, rev = _download(text, revision)
        if alias:
            return Source(d, alias.alias, text, rev, alias.alias, alias.version)
        return Source(d, text.split("/")[1].lower(), text, rev)
    known = f"known aliases: {', '.join(a for a, s in specs.items() if s.repo)}; see `dllm models`"
    if "/" not in text:
        raise ConvertError(f"unknown model alias {clip(text)} (and no such directory)", known)
    raise ConvertError(f"{clip(text)} is not a directory, a known model alias or a Hugging Face repo id (org/name)",
                       known)


def _check_repo_id(repo: str) -> None:
    """The Hub's own rules for a repo id (``a/..``, ``a/b--c``, ``org/-x`` are refused before any request)."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo)
    except HFValidationError:
        raise ConvertError(f"{clip(repo)} is not a valid Hugging Face repo id",
                           "org/name: letters, digits, '-', '_' and '.', not starting or ending with '-' or '.', "
                           "no '--' or '..', at most 96 characters") from None


def _exists(path: Path) -> bool:
    """``path.exists()`` that is False for names the OS refuses (too long, NUL bytes) instead of raising."""
    try:
        return path.exists()
    except (OSError, ValueError):
        return False


def _cache_revision(d: Path) -> str:
    """A local path inside an HF cache (``.../snapshots/<commit>``) still knows its revision."""
    return d.name if d.parent.name == "snapshots" else ""


def _hub_cache() -> str | None:
    # read at call time: huggingface_hub freezes HF_HOME / HF_HUB_CACHE when it is first imported
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return str(Path(os.environ["HF_HOME"]) / "hub")
    return None


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "on", "yes", "true"}


def _download(repo: str, revision: str | None) -> tuple[Path, str]:
    from huggingface_hub import snapshot_download
    from huggingface_hub import errors as hf_errors

    offline = _offline()
    try:
        path = snapshot_download(repo, revision=revision, cache_dir=_hub_cache(), local_files_only=offline,
                                 allow_patterns=HF_PATTERNS)
    except hf_errors.LocalEntryNotFoundError:
        where = f"revision {revision!r} of {repo}" if revision else repo
        if offline:
            raise ConvertError(f"{where} is not in the offline Hugging Face cache ({_hub_cache() or 'default'})",
                               "unset HF_HUB_OFFLINE to download it, or point HF_HOME at a cache that has it") from None
        raise ConvertError(f"cannot download {where}: the Hub is unreachable and it is not cached",
                           "check the network or HF_ENDPOINT") from None
    except hf_errors.GatedRepoError:
        raise ConvertError(f"{repo} is gated", "accept its licence on huggingface.co and run `hf auth login`") from None
    except hf_errors.RepositoryNotFoundError:
        raise ConvertError(f"repository {repo} not found on the Hugging Face Hub",
                           "check the repo id, or log in if it is private") from None
    except hf_errors.RevisionNotFoundError:
        raise ConvertError(f"revision {revision!r} not found in {repo}", "pass an existing branch, tag or commit") from None
    except (hf_errors.HfHubHTTPError, OSError) as e:
        raise ConvertError(f"downloading {repo} failed: {e}", "retry, or download it with `hf download`") from None
    except (hf_errors.HFValidationError, ValueError) as e:  # a revision the Hub's client refuses outright
        raise ConvertError(f"cannot download {repo} at revision {clip(revision)}: {clip(str(e), 120, quote=False)}",
                           "pass an existing branch, tag or commit") from None
    p = Path(path)
    return p, p.name if p.parent.name == "snapshots" else (revision or "")


def read_json(path: Path, what: str, hint: str) -> dict:
    if not path.is_file():
        raise ConvertError(f"{what} not found: {path}", hint)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:  # RecursionError: absurdly nested JSON
        raise ConvertError(f"{what} is not valid JSON ({path}): {e}", "re-download the checkpoint") from None
    if not isinstance(doc, dict):
        raise ConvertError(f"{what} must be a JSON object: {path}", "re-download the checkpoint")
    return doc


def open_checkpoint(directory: Path, warn: Callable[[str], None] | None = None) -> Checkpoint:
    """All shards, checked against ``model.safetensors.index.json`` when there is one.

    With an index, only the shards it names are read: a stray ``*.safetensors`` beside them (an old
    download, a merged copy) is ignored with a warning instead of replacing indexed tensors; a tensor that
    is not in the shard the index names is an error."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index, "safetensors index", "re-download the checkpoint").get("weight_map", {})
        if not isinstance(weight_map, dict) or not all(
                isinstance(v, str) and v and Path(v).name == v for v in weight_map.values()):
            raise ConvertError(f"{index.name} in {directory}: weight_map must map tensor names to shard file names",
                               "re-download the checkpoint")
        for shard in sorted(set(weight_map.values())):
            if not (directory / shard).is_file():
                raise ConvertError(f"shard {shard} listed in {index.name} is missing from {directory}",
                                   "re-download the checkpoint")
        shards = sorted(set(weight_map.values()))
        stray = sorted(p.name for p in directory.glob("*.safetensors") if p.name not in shards)
        if stray and warn is not None:
            warn(f"ignoring {', '.join(stray[:3])}{' ...' if len(stray) > 3 else ''} in {directory}: "
                 f"not listed in {index.name}")
        ckpt = Checkpoint(directory, shards)
        for name, shard in weight_map.items():
            where = ckpt.where.get(name)
            if where is None or where.path.name != shard:
                found = f"it is in {where.path.name}" if where is not None else "no shard holds it"
                raise ConvertError(f"{index.name} puts tensor {name!r} in {shard}, but {found}",
                                   "re-download the checkpoint")
        return ckpt
    return Checkpoint(directory)


# ---------------------------------------------------------------- tensor plans and streaming


@dataclass(frozen=True)
class TensorPlan:
    """One GGUF tensor: its numpy-order shape and the source tensors stacked (in order) to make it."""

    name: str
    shape: tuple[int, ...]
    qtype: GGMLQuantizationType
    parts: tuple[str, ...]

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.shape, self.qtype)


def tensor_chunks(ckpt: Checkpoint, plan: TensorPlan) -> Iterator[np.ndarray]:
    """The encoded bytes of ``plan`` in row blocks; the memory map is dropped after every block."""
    for part in plan.parts:
        sf = ckpt.where[part]
        shape = sf.shape(part)
        rows = int(np.prod(shape[:-1], dtype=np.int64)) if len(shape) > 1 else 1
        cols = shape[-1] if shape else 1
        step = max(1, CHUNK_ELEMENTS // max(cols, 1))
        same_bits = _SAME_BITS.get(sf.dtype(part)) == plan.qtype
        for r0 in range(0, rows, step):
            raw = sf.raw(part).reshape(rows, cols)[r0:r0 + step]
            try:
                if same_bits:
                    yield np.ascontiguousarray(raw)
                else:
                    x = bf16_to_f32(raw) if sf.dtype(part) == "BF16" else raw.astype(np.float32)
                    yield quants.quantize(x, plan.qtype)
            finally:
                del raw
                sf.close()  # unmapping keeps file pages out of our RSS on very large shards


@dataclass(frozen=True)
class Progress:
    """Emitted after every tensor (and once at the start with ``done_tensors == 0``)."""

    name: str
    done_tensors: int
    total_tensors: int
    done_bytes: int
    total_bytes: int


ProgressFn = Callable[[Progress], None]


class KVWriter(Protocol):
    def __call__(self, writer: GGUFWriter, /) -> None: ...


def write_gguf(path: Path, arch: str, write_kv: KVWriter, ckpt: Checkpoint, plans: Sequence[TensorPlan],
               progress: ProgressFn | None = None) -> int:
    """Stream a GGUF file to ``path``: header, KV, tensor infos, then tensor data one block at a time.

    Returns the number of tensor-data bytes written. The caller owns atomicity (``path`` is its own temporary file).
    """
    writer = GGUFWriter(path, arch)
    write_kv(writer)
    for p in plans:
        writer.add_tensor_info(p.name, p.shape, np.dtype(np.float32), p.nbytes, raw_dtype=p.qtype)
    total = sum(p.nbytes for p in plans)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        assert writer.fout is not None and len(writer.fout) == 1
        fout = writer.fout[0]
        done = 0
        if progress:
            progress(Progress("", 0, len(plans), 0, total))
        for i, plan in enumerate(plans):
            writer.write_padding(fout, fout.tell())
            written = 0
            for chunk in tensor_chunks(ckpt, plan):
                chunk.tofile(fout)
                written += chunk.nbytes
            if written != plan.nbytes:  # a bug, never user input: the plan and the data disagree
                raise ConvertError(f"internal error: {plan.name} produced {written} bytes, planned {plan.nbytes}")
            writer.write_padding(fout, written)
            done += written
            if progress:
                progress(Progress(plan.name, i + 1, len(plans), done, total))
        fout.flush()
        os.fsync(fout.fileno())
    finally:
        writer.close()
    return total


@dataclass
class AtomicOutput:
    """``with AtomicOutput(out, force) as part:`` write ``part`` (this writer's own ``.OUT.XXXXXXXX.part``);
    it becomes ``out`` only on success.

    The path checks, the temporary name, the rename, the cleanup and the one-line write errors are
    ``dllm_cli.outfiles``'. Two converts racing to one ``out``: each writes its own file; with ``force`` the last
    rename wins, without it the first, and the later one fails with "already exists". ``out`` is always whole.
    """

    out: Path
    force: bool = False
    part: Path | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.out = outfiles.expand(self.out)

    def check(self, need_bytes: int = 1) -> None:
        """Refuse before any work: an existing output without ``force``, a directory, a path that cannot be
        written, or (where the file system tells) a disk without ``need_bytes`` free."""
        outfiles.check(self.out, what="the GGUF", need_bytes=need_bytes, create_parent=True)
        if self.out.exists() and not self.force:
            raise ConvertError(f"{self.out} already exists", "pass --force to overwrite it")

    def __enter__(self) -> Path:
        self.check()
        self.part = outfiles.new_part(self.out, "the GGUF")
        return self.part

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> Literal[False]:
        part, self.part = self.part, None
        assert part is not None
        if exc_type is None:
            outfiles.commit(part, self.out, "the GGUF", overwrite=self.force)
            return False
        outfiles.remove_quietly(part)
        if isinstance(exc, OSError):
            raise outfiles.write_error(self.out, exc, "the GGUF") from None
        return False


# ---------------------------------------------------------------- architecture registry


class Architecture(Protocol):
    """What one converter module provides for its HF architecture name."""

    def __init__(self, config: dict, ckpt: Checkpoint) -> None: ...
    def plan(self, outtype: OutType) -> list[TensorPlan]: ...
    def write_kv(self, writer: GGUFWriter) -> None: ...


_ARCHS: dict[str, type] = {}


def register(*names: str) -> Callable[[type], type]:
    """Class decorator: convert checkpoints whose ``config.json`` ``architectures`` names one of ``names``."""
    def deco(cls: type) -> type:
        for n in names:
            _ARCHS[n] = cls
        return cls
    return deco


def supported_architectures() -> list[str]:
    return sorted(_ARCHS)


def architecture_class(config: dict) -> type:
    archs = config.get("architectures")
    if not isinstance(archs, list) or not archs or not all(isinstance(a, str) for a in archs):
        raise ConvertError("config.json has no 'architectures' list",
                           f"supported: {', '.join(supported_architectures())}")
    for a in archs:
        if a in _ARCHS:
            return _ARCHS[a]
    raise ConvertError(f"unsupported architecture {', '.join(map(str, archs))}",
                       f"supported: {', '.join(supported_architectures())}")
