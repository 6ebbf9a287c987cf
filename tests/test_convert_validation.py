"""Malformed checkpoints end in one ConvertError naming the field, never an internal error.

Each row corrupts one field of a good tiny checkpoint (config.json, a safetensors header, the shard index,
tokenizer.json, tokenizer_config.json) with a wrong type, a negative, a zero, a missing value or a relation that
does not hold, and expects ``convert`` to raise a ConvertError whose message contains the row's needle. Without the
fix these rows raise ZeroDivisionError, AttributeError, ValueError, TypeError, RecursionError, ...
"""
from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import pytest

from converters import convert
from dllm_cli.errors import ConvertError
from io_helpers import part_files

DLLM = str(Path(sys.executable).with_name("dllm"))
MISSING = object()


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    from dllm_cli.demo.checkpoint import tiny_config, write_checkpoint

    d = tmp_path_factory.mktemp("conv") / "LLaDA2.1-tiny"
    write_checkpoint(d, tiny_config(), seed=5)  # 8 experts, 2 groups (top 1), top-2, 4/2 heads x 16, 3 layers
    return d


@pytest.fixture
def ckpt(pristine, tmp_path) -> Path:
    d = tmp_path / pristine.name
    shutil.copytree(pristine, d)
    return d


def _edit_json(path: Path, change: Callable[[Any], Any]) -> None:
    doc = json.loads(path.read_text())
    path.write_text(json.dumps(change(doc)))


def _set(key: str, value: Any) -> Callable[[dict], dict]:
    def change(doc: dict) -> dict:
        if value is MISSING:
            doc.pop(key, None)
        else:
            doc[key] = value
        return doc
    return change


CONFIG = [
    ("n_group", 0), ("n_group", -1), ("n_group", 3), ("n_group", "2"), ("n_group", 2.5), ("n_group", MISSING),
    ("n_group", True), ("n_group", None), ("n_group", 8),
    ("num_key_value_heads", 0), ("num_key_value_heads", 3), ("num_key_value_heads", -2), ("num_key_value_heads", "2"),
    ("num_key_value_heads", 1.5), ("num_attention_heads", 0), ("num_attention_heads", -4),
    ("hidden_size", 0), ("hidden_size", -64), ("hidden_size", [64]),
    ("num_experts", 0), ("num_experts", 2000), ("num_experts", {"n": 8}),
    ("num_experts_per_tok", 0), ("num_experts_per_tok", 9), ("num_experts_per_tok", 5),
    ("topk_group", 0), ("topk_group", 3), ("topk_group", -1),
    ("first_k_dense_replace", -1), ("first_k_dense_replace", 4),
    ("num_hidden_layers", 0), ("num_hidden_layers", 600), ("num_hidden_layers", MISSING),
    ("head_dim", 0), ("head_dim", "16"), ("head_dim", -16), ("head_dim", 16.5),
    ("partial_rotary_factor", 0), ("partial_rotary_factor", 1.5), ("partial_rotary_factor", -0.5),
    ("partial_rotary_factor", 0.1875),  # 16 * 0.1875 = 3 rotary dims: odd
    ("rms_norm_eps", 0), ("rms_norm_eps", -1e-6), ("rms_norm_eps", "1e-6"), ("rms_norm_eps", float("nan")),
    ("rope_theta", 0), ("rope_theta", float("inf")), ("routed_scaling_factor", "2.5"),
    ("routed_scaling_factor", float("nan")), ("norm_topk_prob", "yes"), ("norm_topk_prob", 1),
    ("vocab_size", 0), ("vocab_size", -1), ("vocab_size", 10**400), ("hidden_size", 2**64), ("rope_theta", 10**400), ("max_position_embeddings", 0), ("moe_intermediate_size", 0),
    ("num_shared_experts", 0), ("intermediate_size", 0),
]


@pytest.mark.parametrize("key,value", CONFIG, ids=[f"{k}={v!r}" for k, v in CONFIG])
def test_bad_config_values_name_the_key(ckpt, tmp_path, key, value):
    _edit_json(ckpt / "config.json", _set(key, value))
    with pytest.raises(ConvertError) as info:
        convert(ckpt, tmp_path / "out.gguf", outtype="f32")
    names = {"head_dim": "head_dim", "partial_rotary_factor": "partial_rotary_factor"}
    assert names.get(key, key) in str(info.value), str(info.value)
    assert not (tmp_path / "out.gguf").exists() and not part_files(tmp_path / "out.gguf")


ARCHS = [[{"x": 1}], "LLaDA2MoeModelLM", [], [None], 5]


@pytest.mark.parametrize("archs", ARCHS, ids=map(repr, ARCHS))
def test_bad_architectures_field(ckpt, tmp_path, archs):
    _edit_json(ckpt / "config.json", _set("architectures", archs))
    with pytest.raises(ConvertError, match="architectures"):
        convert(ckpt, tmp_path / "out.gguf", outtype="f32")


def test_topk_group_equal_to_n_group_converts_as_no_group_limit(ckpt, tmp_path):
    from gguf import GGUFReader

    from dllm_cli import gguf_keys as K

    _edit_json(ckpt / "config.json", _set("topk_group", 2))
    path = convert(ckpt, tmp_path / "out.gguf", outtype="f32").path
    r = GGUFReader(path)
    assert (r.get_field(K.EXPERT_GROUPS).contents(), r.get_field(K.EXPERT_GROUPS_USED).contents()) == (0, 0)


def test_a_non_integer_pad_token_id_in_config_is_ignored(ckpt, tmp_path):
    _edit_json(ckpt / "config.json", _set("pad_token_id", "zero"))
    assert convert(ckpt, tmp_path / "out.gguf", outtype="f32").path.is_file()


def _write_safetensors(path: Path, header: bytes) -> None:
    header += b" " * (-len(header) % 8)
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 64)


HEADERS = {
    "a JSON list": b"[]",
    "a JSON string": b'"tensors"',
    "a number": b"5",
    "null": b"null",
    "entry not an object": b'{"a": 5}',
    "entry a list": b'{"a": [1, 2]}',
    "no dtype": b'{"a": {"shape": [4], "data_offsets": [0, 16]}}',
    "dtype a number": b'{"a": {"dtype": 5, "shape": [4], "data_offsets": [0, 16]}}',
    "no offsets": b'{"a": {"dtype": "F32", "shape": [4]}}',
    "one offset": b'{"a": {"dtype": "F32", "shape": [4], "data_offsets": [0]}}',
    "string offsets": b'{"a": {"dtype": "F32", "shape": [4], "data_offsets": ["0", "16"]}}',
    "negative offset": b'{"a": {"dtype": "F32", "shape": [4], "data_offsets": [-16, 0]}}',
    "reversed offsets": b'{"a": {"dtype": "F32", "shape": [4], "data_offsets": [16, 0]}}',
    "float offsets": b'{"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16.0]}}',
    "offsets an object": b'{"a": {"dtype": "F32", "shape": [4], "data_offsets": {"start": 0}}}',
    "shape a string": b'{"a": {"dtype": "F32", "shape": "4", "data_offsets": [0, 16]}}',
    "negative dim": b'{"a": {"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]}}',
    "float dim": b'{"a": {"dtype": "F32", "shape": [2.5], "data_offsets": [0, 16]}}',
    "bool dim": b'{"a": {"dtype": "F32", "shape": [true], "data_offsets": [0, 4]}}',
    "huge dims": b'{"a": {"dtype": "F32", "shape": [4294967296, 4294967296, 4294967296], "data_offsets": [0, 16]}}',
    "unknown dtype": b'{"a": {"dtype": "F128", "shape": [4], "data_offsets": [0, 16]}}',
    "past the end": b'{"a": {"dtype": "F32", "shape": [400], "data_offsets": [0, 1600]}}',
    "deeply nested": b"[" * 100000 + b"]" * 100000,
    "not JSON": b"{not json",
    "not UTF-8": b'{"\xff\xfe": 1}',
}


@pytest.mark.parametrize("case", list(HEADERS))
def test_bad_safetensors_headers(ckpt, tmp_path, case):
    _write_safetensors(ckpt / "extra.safetensors", HEADERS[case])
    with pytest.raises(ConvertError, match="safetensors|extra|F128"):
        convert(ckpt, tmp_path / "out.gguf", outtype="f32")


INDEXES = {"a list": [], "weight_map a list": {"weight_map": ["model.safetensors"]},
           "shard an int": {"weight_map": {"a": 5}}, "shard a path": {"weight_map": {"a": "../model.safetensors"}},
           "shard empty": {"weight_map": {"a": ""}}}


@pytest.mark.parametrize("case", list(INDEXES))
def test_bad_shard_index(ckpt, tmp_path, case):
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(INDEXES[case]))
    with pytest.raises(ConvertError, match="index"):
        convert(ckpt, tmp_path / "out.gguf", outtype="f32")


def _added(change: Callable[[list], Any]) -> Callable[[dict], dict]:
    def edit(doc: dict) -> dict:
        doc["added_tokens"] = change(doc["added_tokens"])
        return doc
    return edit


def _first_added(key: str, value: Any) -> Callable[[dict], dict]:
    return _added(lambda toks: [_set(key, value)(toks[0]), *toks[1:]])


def _model(key: str, value: Any) -> Callable[[dict], dict]:
    def edit(doc: dict) -> dict:
        doc["model"][key] = value
        return doc
    return edit


def _first_vocab(value: Any) -> Callable[[dict], dict]:
    def edit(doc: dict) -> dict:
        first = next(iter(doc["model"]["vocab"]))
        doc["model"]["vocab"][first] = value
        return doc
    return edit


TOKENIZER = {
    "added id a string": (_first_added("id", "296"), "added_tokens[0].id"),
    "added id a float": (_first_added("id", 296.5), "added_tokens[0].id"),
    "added id negative": (_first_added("id", -1), "added_tokens[0].id"),
    "added id null": (_first_added("id", None), "added_tokens[0].id"),
    "added id missing": (_first_added("id", MISSING), "added_tokens[0].id"),
    "added id a bool": (_first_added("id", True), "added_tokens[0].id"),
    "added id past the vocab": (_first_added("id", 10**9), "vocab_size"),
    "added content a number": (_first_added("content", 5), "added_tokens[0]"),
    "added content missing": (_first_added("content", MISSING), "added_tokens[0]"),
    "added content empty": (_first_added("content", ""), "added_tokens[0]"),
    "added token a string": (_added(lambda toks: ["<|mask|>", *toks]), "added_tokens[0]"),
    "added_tokens an object": (_added(lambda toks: {"a": 1}), "added_tokens"),
    "vocab id a string": (_first_vocab("0"), "model.vocab"),
    "vocab id negative": (_first_vocab(-2), "model.vocab"),
    "vocab id a float": (_first_vocab(0.5), "model.vocab"),
    "merges of numbers": (_model("merges", [1, 2]), "merges"),
    "merges of singles": (_model("merges", [["a"]]), "merges"),
    "merges a string": (_model("merges", "h e"), "merges"),
    "vocab a list": (_model("vocab", ["a", "b"]), "BPE"),
    "model a list": (lambda doc: {**doc, "model": [1]}, "BPE"),
    "wordpiece": (_model("type", "WordPiece"), "BPE"),
    "document a list": (lambda doc: [doc], "JSON object"),
}


@pytest.mark.parametrize("case", list(TOKENIZER))
def test_bad_tokenizer_fields_name_the_field(ckpt, tmp_path, case):
    change, needle = TOKENIZER[case]
    _edit_json(ckpt / "tokenizer.json", change)
    with pytest.raises(ConvertError) as info:
        convert(ckpt, tmp_path / "out.gguf", outtype="f32")
    assert needle in str(info.value), str(info.value)


TOKENIZER_CONFIG = {"pad_token a number": ("pad_token", 5), "bos_token without content": ("bos_token", {"x": 1}),
                    "pad_token a list": ("pad_token", ["<|endoftext|>"])}


@pytest.mark.parametrize("case", list(TOKENIZER_CONFIG))
def test_bad_tokenizer_config_fields(ckpt, tmp_path, case):
    key, value = TOKENIZER_CONFIG[case]
    _edit_json(ckpt / "tokenizer_config.json", _set(key, value))
    with pytest.raises(ConvertError, match=key):
        convert(ckpt, tmp_path / "out.gguf", outtype="f32")


def test_named_templates_with_odd_entries_are_tolerated(ckpt, tmp_path):
    _edit_json(ckpt / "tokenizer_config.json", _set("chat_template", ["x", 5, {"name": "default", "template": "t"}]))
    assert convert(ckpt, tmp_path / "out.gguf", outtype="f32").path.is_file()


CLI = {
    "config": ("config.json", _set("n_group", 0), "n_group"),
    "kv heads": ("config.json", _set("num_key_value_heads", 0), "num_key_value_heads"),
    "header": ("model.safetensors", None, "safetensors"),
    "added id": ("tokenizer.json", _first_added("id", "x"), "added_tokens[0].id"),
}


@pytest.mark.parametrize("case", list(CLI))
def test_cli_convert_errors_are_one_line(ckpt, tmp_path, case):
    name, change, needle = CLI[case]
    if change is None:
        _write_safetensors(ckpt / name, b"[1, 2]")
    else:
        _edit_json(ckpt / name, change)
    out = tmp_path / "outdir"
    out.mkdir()
    r = subprocess.run([DLLM, "convert", str(ckpt), "-o", str(out / "m.gguf"), "--outtype", "f32"],
                       capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
                       env=dict(os.environ, DLLM_DEBUG="0"))
    assert r.returncode == 1 and r.stdout == "", (r.returncode, r.stderr)
    assert len(r.stderr.strip().splitlines()) == 1 and needle in r.stderr and "internal error" not in r.stderr
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("overrides", [dict(num_shared_experts=2), dict(n_group=4, topk_group=4, num_experts_per_tok=3),
                                       dict(n_group=1, topk_group=1, num_experts=2, num_experts_per_tok=2),
                                       dict(first_k_dense_replace=0), dict(num_key_value_heads=1)])
def test_valid_edge_configs_convert_to_files_the_runtime_accepts(tmp_path, overrides):
    """What the converter accepts passes every check the loader applies (``runtime/hparams.py``)."""
    from dllm_cli.demo.checkpoint import tiny_config, write_checkpoint
    from dllm_cli.runtime.model import inspect_gguf

    write_checkpoint(tmp_path / "c", tiny_config(**overrides), seed=1)
    inspect_gguf(convert(tmp_path / "c", tmp_path / "m.gguf", outtype="f32").path)
