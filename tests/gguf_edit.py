"""Test helper: copy a GGUF with some metadata changed, dropped, or tensors replaced (bad-input tests).

``rewrite(src, dst, set={key: value_or_(value, GGUFValueType)}, drop=[keys], tensors={name: array or None})``.
A bare Python value is written with the type of the key it replaces (or UINT32/FLOAT32/STRING/BOOL by its
Python type); a tensor mapped to None is dropped.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
from gguf import GGUFReader, GGUFValueType, GGUFWriter

T = GGUFValueType


def _guess(value: Any) -> GGUFValueType:
    if isinstance(value, bool):
        return T.BOOL
    if isinstance(value, int):
        return T.UINT32 if value >= 0 else T.INT32
    if isinstance(value, float):
        return T.FLOAT32
    return T.STRING


def rewrite(src: Path, dst: Path, *, set: Mapping[str, Any] | None = None, drop: Iterable[str] = (),
            tensors: Mapping[str, np.ndarray | None] | None = None) -> Path:
    reader = GGUFReader(src)
    changes = dict(set or {})
    dropped = {*drop}
    new_tensors = dict(tensors or {})
    w = GGUFWriter(dst, str(reader.get_field("general.architecture").contents()))
    for field in reader.fields.values():
        name = field.name
        if name.startswith("GGUF.") or name == "general.architecture" or name in dropped:
            continue
        if name in changes:
            value = changes.pop(name)
            vtype = value[1] if isinstance(value, tuple) else (field.types[0] if field.types[0] != T.ARRAY
                                                                 else _guess(value))
            value = value[0] if isinstance(value, tuple) else value
            w.add_key_value(name, value, vtype, sub_type=T.STRING if vtype == T.ARRAY else None)
            continue
        if field.types[0] == T.ARRAY:
            w.add_key_value(name, field.contents(), T.ARRAY, sub_type=field.types[1])
        else:
            w.add_key_value(name, field.contents(), field.types[0])
    for name, value in changes.items():  # new keys
        vtype = value[1] if isinstance(value, tuple) else _guess(value)
        w.add_key_value(name, value[0] if isinstance(value, tuple) else value, vtype)
    for t in reader.tensors:
        data = new_tensors.pop(t.name, t.data) if t.name in new_tensors else t.data
        if data is None:
            continue
        w.add_tensor(t.name, np.array(data))
    for name, data in new_tensors.items():
        if data is not None:
            w.add_tensor(name, np.asarray(data))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst
