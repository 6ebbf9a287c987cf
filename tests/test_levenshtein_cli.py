"""LLaDA2.2 Levenshtein editing in the front ends (issue 14): ``dllm run --json`` counts inserts and deletes,
``--no-indel`` / ``--no-edit`` switch them off, ``dllm bench`` reports them per token, traces carry and replay
them, and older 2.2 files (no ``indel`` preset) get the registry's Levenshtein presets."""
from __future__ import annotations

import json

import gguf
import pytest

from converters import convert
from dllm_cli import gguf_keys as K
from gguf_edit import rewrite
from io_helpers import dllm, one_line
from runtime_marks import needs_runtime
from test_llada22 import write_llada22

pytestmark = needs_runtime
PROMPT = "Sort 3 1 2 and tell me about the fox."


@pytest.fixture(scope="module")
def tiny22(tmp_path_factory):
    d = tmp_path_factory.mktemp("lev-cli")
    write_llada22(d / "ckpt", edit_boost=3.0)
    return convert(d / "ckpt", d / "tiny22-f32.gguf", outtype="f32").path


def run_json(path, *args):
    r = dllm("run", str(path), PROMPT, "--json", "--max-tokens", "64", *args)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_run_json_counts_inserts_and_deletes_separately(tiny22):
    doc = run_json(tiny22, "--mode", "speed")
    assert doc["params"]["indel"] is True and doc["inserts"] > 0 and doc["deletes"] > 0 and doc["edits"] > 0
    tokens = gguf.GGUFReader(tiny22).fields
    edit_ids = {int(tokens[K.DELETE_ID].contents()), int(tokens[K.SPLIT_ID].contents())}
    assert not edit_ids & set(doc["tokens"]), "DELETE/SPLIT never reach the output"


def test_no_indel_keeps_substitution_and_no_edit_turns_all_editing_off(tiny22):
    sub = run_json(tiny22, "--mode", "speed", "--no-indel")
    assert sub["params"]["indel"] is False and sub["inserts"] == sub["deletes"] == 0 and sub["edits"] > 0
    off = run_json(tiny22, "--mode", "speed", "--no-edit")
    assert off["params"]["editing"] is False and off["inserts"] == off["deletes"] == off["edits"] == 0


def test_bad_combinations_are_usage_errors(tiny22, tmp_path):
    r = dllm("run", str(tiny22), PROMPT, "--temperature", "0.8")
    assert r.returncode == 2
    one_line(r.stderr, "greedily", "--no-edit")
    d = tmp_path / "c21"
    from dllm_cli.demo.checkpoint import tiny_config, write_checkpoint

    write_checkpoint(d, tiny_config(), seed=1)
    p21 = convert(d, tmp_path / "t21.gguf", outtype="f32").path
    r = dllm("run", str(p21), PROMPT, "--indel")
    assert r.returncode == 2
    one_line(r.stderr, "--indel needs a LLaDA2.2 model")


def test_trace_carries_inserts_and_deletes_and_replays(tiny22, tmp_path):
    trace = tmp_path / "t.jsonl"
    doc = run_json(tiny22, "--mode", "speed", "--trace", str(trace))
    steps = [json.loads(line) for line in trace.read_text().splitlines() if '"event": "step"' in line]
    assert sum(len(s["inserted"]) for s in steps) == doc["inserts"]
    assert sum(len(s["deleted"]) for s in steps) == doc["deletes"]
    deleted_ids = {old for s in steps for _b, _a, old in s["deleted"]}
    pieces = {}
    for line in trace.read_text().splitlines():
        pieces.update(json.loads(line).get("pieces", {}))
    assert {str(i) for i in deleted_ids} <= set(pieces), "a deleted token's text is in the trace for the replay"
    r = dllm("chat", "--replay", str(trace), "--speed", "0")
    assert r.returncode == 0, r.stderr


def test_bench_reports_inserts_and_deletes_per_token(tiny22):
    r = dllm("bench", str(tiny22), "--json", "--reps", "1", "--warmup", "0", "--max-tokens", "40", "--prefill", "64",
             "--prefix", "64", "--ar-tokens", "4", "--threads", "2", "--recompute-samples", "1", "--quiet",
             "--no-experts", timeout=600)
    assert r.returncode == 0, r.stderr
    gen = [x for x in json.loads(r.stdout)["results"] if x["test"].startswith("gen/")]
    assert gen and all({"inserts_per_token", "deletes_per_token", "inserts", "deletes"} <= set(x) for x in gen)
    speed = next(x for x in gen if x["mode"] == "speed")
    assert speed["inserts"] > 0 and speed["deletes_per_token"] == pytest.approx(speed["deletes"] / speed["tokens"],
                                                                                  abs=1e-4)
    from dllm_cli.bench import report

    assert "ins/del per tok" in report.table(json.loads(r.stdout))


def test_a_22_file_written_before_the_levenshtein_decoder_gets_its_presets(tiny22, tmp_path):
    old = rewrite(tiny22, tmp_path / "old22.gguf", set={K.preset_key("speed", "editing"): False,
                                                      K.preset_key("quality", "editing"): False},
                  drop=[K.preset_key(m, "indel") for m in ("speed", "quality")])
    doc = run_json(old, "--mode", "quality")
    assert doc["params"]["indel"] is True and doc["params"]["editing"] is True and doc["params"]["threshold"] == 0.9


def test_synthetic_22_files_carry_edit_ids_and_decode_with_the_levenshtein_policy():
    from dllm_cli.bench.synthetic import build_synthetic

    tiny = dict(hidden_size=64, num_attention_heads=4, head_dim=16, intermediate_size=96, moe_intermediate_size=32,
                num_experts=16, num_experts_per_tok=2, n_group=4, topk_group=2, vocab_size=512, expert_capacity=4)
    m = build_synthetic("llada2.2-mini", layers=2, quant="f16", overrides=tiny)
    assert "-r2-" in m.path.name
    fields = gguf.GGUFReader(m.path).fields
    assert (int(fields[K.DELETE_ID].contents()), int(fields[K.SPLIT_ID].contents())) == (510, 511)
    assert fields[K.preset_key("speed", "indel")].contents() is True
    doc = run_json(m.path, "--mode", "speed", "--raw")
    assert doc["params"]["indel"] is True and doc["forwards"] > 0 and {"inserts", "deletes"} <= set(doc)
