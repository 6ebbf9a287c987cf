"""Minimal lazy safetensors reader and writer (no torch).

Reading maps the file and hands out one tensor at a time, so converting a checkpoint never holds
more than the tensor being written. bf16 has no numpy dtype: it is read as uint16 and widened.
"""
from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Iterator, Mapping

import numpy as np

from dllm_cli.errors import ConvertError

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
_HEADER_LIMIT = 100 * 1024 * 1024


def _is_count(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _entry(info: object) -> tuple[str | None, int, int, tuple[int, ...]]:
    """(dtype, start, end, shape) of one header entry, or (None, ...) when any field has the wrong form."""
    if not isinstance(info, dict):
        return None, 0, 0, ()
    dtype, offsets, shape = info.get("dtype"), info.get("data_offsets"), info.get("shape")
    if (not isinstance(dtype, str) or not isinstance(offsets, list) or len(offsets) != 2
            or not all(map(_is_count, offsets)) or offsets[0] > offsets[1]
            or not isinstance(shape, list) or not all(map(_is_count, shape)) or len(shape) > 8):
        return None, 0, 0, ()
    return dtype, offsets[0], offsets[1], tuple(shape)


def bf16_to_f32(raw: np.ndarray) -> np.ndarray:
    """Widen raw bf16 bits (uint16) to float32 exactly."""
    return (raw.astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """Round float32 to bf16 bits (uint16), round-to-nearest-even."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = bits + 0x7FFF + ((bits >> 16) & 1)
    return (rounded >> 16).astype(np.uint16)


class SafetensorsFile:
    """One ``.safetensors`` file, validated on open, tensors read lazily through a memory map."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise ValueError("file shorter than its 8-byte header length")
                (n,) = struct.unpack("<Q", head)
                if n > _HEADER_LIMIT or 8 + n > size:
                    raise ValueError("header length points past the end of the file")
                header = json.loads(f.read(n))
        except (OSError, ValueError, UnicodeDecodeError, RecursionError) as e:
            raise ConvertError(f"corrupt safetensors file {self.path}: {e}",
                               "re-download the checkpoint") from None
        self._base = 8 + n
        if not isinstance(header, dict):
            raise ConvertError(f"corrupt safetensors header in {self.path}: a JSON {type(header).__name__}, "
                               "not an object", "re-download the checkpoint")
        header.pop("__metadata__", None)
        self.entries: dict[str, dict] = {}
        for name, info in header.items():
            dtype, start, end, shape = _entry(info)
            if dtype is None:
                raise ConvertError(f"corrupt safetensors header in {self.path} at tensor {name!r}: needs "
                                   "dtype (string), shape (list of integers >= 0) and data_offsets "
                                   "([start, end] integers, 0 <= start <= end)", "re-download the checkpoint")
            if dtype not in _DTYPES:
                raise ConvertError(f"tensor {name!r} in {self.path} has unsupported dtype {dtype}")
            nbytes = math.prod(shape) * np.dtype(_DTYPES[dtype]).itemsize  # exact: no int64 wrap-around
            if end - start != nbytes or self._base + end > size:
                raise ConvertError(
                    f"truncated or corrupt safetensors file {self.path}: tensor {name!r} "
                    f"needs bytes {start}..{end} but the data ends at {size - self._base}",
                    "re-download the checkpoint")
            self.entries[name] = {"dtype": dtype, "start": start, "shape": shape}
        self._map: np.memmap | None = None

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name]["shape"]

    def dtype(self, name: str) -> str:
        return self.entries[name]["dtype"]

    def nbytes(self, name: str) -> int:
        e = self.entries[name]
        return int(np.prod(e["shape"], dtype=np.int64)) * np.dtype(_DTYPES[e["dtype"]]).itemsize

    def raw(self, name: str) -> np.ndarray:
        """The stored values as a read-only view (bf16 as uint16 bits)."""
        if self._map is None:
            self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        e = self.entries[name]
        dt = np.dtype(_DTYPES[e["dtype"]])
        count = int(np.prod(e["shape"], dtype=np.int64))
        start = self._base + e["start"]
        return self._map[start:start + count * dt.itemsize].view(dt).reshape(e["shape"])

    def get(self, name: str, dtype: type = np.float32) -> np.ndarray:
        """The tensor converted to ``dtype`` (a fresh array)."""
        raw = self.raw(name)
        if self.entries[name]["dtype"] == "BF16":
            return bf16_to_f32(raw).astype(dtype, copy=False)
        return np.asarray(raw, dtype=dtype).copy() if raw.dtype == dtype else raw.astype(dtype)

    def close(self) -> None:
        self._map = None


def save_file(tensors: Mapping[str, np.ndarray], path: str | Path, bf16: frozenset[str] = frozenset()) -> None:
    """Write tensors to ``path``; names in ``bf16`` are stored as BF16 (rounded from float32)."""
    header: dict = {}
    blobs: list[bytes] = []
    offset = 0
    names = {np.dtype(v): k for k, v in _DTYPES.items() if k != "BF16"}
    for name, arr in tensors.items():
        if name in bf16:
            data, dtype = f32_to_bf16(arr), "BF16"
        else:
            data, dtype = np.ascontiguousarray(arr), names[np.asarray(arr).dtype]
        blob = data.tobytes()
        header[name] = {"dtype": dtype, "shape": list(np.shape(arr)), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for blob in blobs:
            f.write(blob)


class Checkpoint:
    """The safetensors shards of an HF checkpoint directory, indexed by tensor name.

    ``shards`` (the files ``model.safetensors.index.json`` names) limits it to those files; without it every
    ``*.safetensors`` in the directory is a shard. A tensor found in two shards is an error, never a silent
    choice of one of them.
    """

    def __init__(self, directory: str | Path, shards: list[str] | None = None) -> None:
        self.dir = Path(directory)
        files = [self.dir / s for s in sorted(shards)] if shards is not None else sorted(self.dir.glob("*.safetensors"))
        if not files:
            raise ConvertError(f"no .safetensors files in {self.dir}",
                               "point at a Hugging Face checkpoint directory")
        self.files = [SafetensorsFile(p) for p in files]
        self.where: dict[str, SafetensorsFile] = {}
        for f in self.files:
            for k in f.keys():
                if k in self.where:
                    raise ConvertError(f"tensor {k!r} is in two shards: {self.where[k].path.name} and {f.path.name}",
                                       "remove the stray file from the checkpoint directory")
                self.where[k] = f

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def names(self) -> list[str]:
        return list(self.where)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.where[name].shape(name)

    def get(self, name: str, dtype: type = np.float32) -> np.ndarray:
        return self.where[name].get(name, dtype)

    def items(self, dtype: type = np.float32) -> Iterator[tuple[str, np.ndarray]]:
        for name in self.where:
            yield name, self.get(name, dtype)
