"""dllm bench on tiny models: the JSON schema, consistent counters, the experts probe against the numpy
reference, --compare, the report formats, and the synthetic builder's shapes. No timing thresholds."""
from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from dllm_cli.bench import report
from dllm_cli.bench.synthetic import build_synthetic, synthetic_config
from dllm_cli.cli.app import app
from dllm_cli.errors import UsageError

TINY = dict(hidden_size=64, num_attention_heads=4, head_dim=16, intermediate_size=96, moe_intermediate_size=32,
            num_experts=16, num_experts_per_tok=2, n_group=4, topk_group=2, vocab_size=512)
ROW_KEYS = {"model", "path", "size_bytes", "params", "backend", "threads", "kv_type", "n_layers", "test", "reps",
            "tps", "tps_sd", "peak_rss_bytes"}
GEN_KEYS = {"mode", "tokens", "forwards", "tpf", "forwards_per_block", "blocks", "edits", "edits_per_token",
            "prompt_tokens", "prefill_tps", "first_block_s", "step_s", "experts", "recompute", "roofline", "vs_ar"}
BENCH_ARGS = ["--reps", "1", "--warmup", "0", "--max-tokens", "40", "--prefill", "64", "--prefix", "64",
              "--ar-tokens", "4", "--threads", "2", "--recompute-samples", "2", "--quiet"]


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    from converters import convert
    from dllm_cli.demo.checkpoint import tiny_config, write_checkpoint

    d = tmp_path_factory.mktemp("bench")
    write_checkpoint(d / "ckpt", tiny_config(num_hidden_layers=3, num_experts=8), seed=3, head_scale=3.0)
    return convert(d / "ckpt", d / "tiny-f32.gguf", outtype="f32").path


@pytest.fixture(scope="module")
def bench_doc(tiny_gguf, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "a.json"
    res = CliRunner().invoke(app, ["bench", str(tiny_gguf), "--json", "--save", str(out), *BENCH_ARGS])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert json.loads(out.read_text()) == doc
    return doc, out


def test_json_schema(bench_doc):
    doc, _ = bench_doc
    assert doc["schema"] == report.SCHEMA
    assert {"cpu", "cores", "matmul_gflops", "bandwidth_gbs", "load_avg"} <= set(doc["machine"])
    tests = [r["test"] for r in doc["results"]]
    assert tests == ["pp64", "pp64/blockwise", "step@64", "recompute@64", "ar", "gen/speed", "gen/quality"]
    for r in doc["results"]:
        assert ROW_KEYS <= set(r), ROW_KEYS - set(r)
        assert r["tps"] > 0 and r["threads"] == 2 and r["n_layers"] == 3
    for r in doc["results"][-2:]:
        assert GEN_KEYS <= set(r), GEN_KEYS - set(r)
        assert {"mean", "sd", "p50", "p90", "n"} <= set(r["step_s"])
        assert r["roofline"]["pct_of_roofline"] > 0


def test_counters_are_consistent(bench_doc):
    doc, _ = bench_doc
    for r in (x for x in doc["results"] if x["test"].startswith("gen/")):
        assert r["tokens"] == 2 * 40 or r["tokens"] <= 2 * 40  # two prompts, EOS may stop early
        assert r["forwards"] * r["tpf"] == pytest.approx(r["tokens"], rel=1e-3)
        assert r["forwards"] >= r["blocks"] >= 2  # at least one forward per block per prompt
        assert r["step_s"]["n"] == r["forwards"]  # one timed step per refinement forward (reps=1)
        assert r["forwards_per_block"] == pytest.approx(r["forwards"] / r["blocks"], abs=1e-3)
        ex = r["experts"]
        assert ex["of"] == 8 and ex["per_token"] == 2
        assert set(ex["per_layer_mean"]) == {"1", "2"}  # layer 0 is dense
        assert ex["per_token"] <= ex["mean"] <= ex["max"] <= ex["of"]
        assert r["recompute"]["samples"] >= 1 and r["recompute"]["ratio"] > 0
    ar = next(x for x in doc["results"] if x["test"] == "ar")
    assert ar["tpf"] == 1.0 and ar["step_s"]["n"] == 1


def test_expert_probe_matches_reference(tiny_gguf):
    """The union read from llama.cpp's ffn_moe_topk tensors equals the numpy reference's routing."""
    from dllm_cli.bench.experts import ExpertProbe
    from dllm_cli.reference import load_gguf
    from dllm_cli.runtime.model import Model
    from dllm_cli.runtime.options import RuntimeOptions
    from dllm_cli.runtime.session import Session

    opts = RuntimeOptions(kv_type="f32", flash_attn=False, ctx_size=256, ubatch=256, threads=2)
    rng = np.random.default_rng(0)
    with Model(tiny_gguf, opts) as model:
        probe = ExpertProbe(model.rt)
        with Session(model, opts, eval_callback=probe.callback) as s:
            prompt = [int(t) for t in rng.integers(0, model.mask_id, 32)]
            block = [int(t) for t in rng.integers(0, model.mask_id, 10)] + [model.mask_id] * 22
            s.commit(prompt, 0)
            probe.clear()
            s.step(block, 32, range(32))
            got = {il: np.unique(ids) for il, ids in probe.layers.items()}
    ref = load_gguf(tiny_gguf, np.float64)
    ref.forward(np.asarray(prompt + block))
    want = {il: np.unique(r.ids[32:]) for il, r in enumerate(ref.last_routes) if r is not None}
    assert set(got) == set(want) == {1, 2}
    for il in want:
        np.testing.assert_array_equal(got[il], want[il])
        assert probe.layers[il].shape == (32, 2)


def test_compare_and_formats(bench_doc, tmp_path):
    doc, a = bench_doc
    b = tmp_path / "b.json"
    slower = json.loads(json.dumps(doc))
    for r in slower["results"]:
        r["tps"] /= 2
    b.write_text(json.dumps(slower))
    res = CliRunner().invoke(app, ["bench", "--compare", str(a), "--compare", str(b), "--json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)["rows"]
    assert len(rows) == len(doc["results"])
    assert all(r["tps_delta_pct"] == pytest.approx(-50.0, abs=0.1) for r in rows)
    text = CliRunner().invoke(app, ["bench", "--compare", str(a), "--compare", str(b)])
    assert text.exit_code == 0 and "gen/speed" in text.stdout
    md = report.table(doc, markdown=True).split("\n\n")[0].splitlines()  # the main table; the roofline follows
    assert md[0].startswith("| model") and len(md) == 2 + len(doc["results"])
    csv_lines = report.to_csv(doc).splitlines()
    assert len(csv_lines) == 1 + len(doc["results"]) and "experts.mean" in csv_lines[0]
    bad = CliRunner().invoke(app, ["bench", "--compare", str(a)])
    assert isinstance(bad.exception, UsageError) and bad.exception.exit_code == 2


def test_estimate_layers_is_linear():
    base = {"backend": "cpu", "threads": 2, "test": "gen/speed"}
    rows = [{**base, "path": "/x/llada2-mini-L2-q4_k_m.gguf", "model": "m", "n_layers": 2, "tps": 10.0,
             "step_s": {"mean": 0.1}},
            {**base, "path": "/x/llada2-mini-L4-q4_k_m.gguf", "model": "m", "n_layers": 4, "tps": 5.0,
             "step_s": {"mean": 0.2}}]
    (est,) = report.estimate_layers(rows, 20)
    assert est["step_s"] == pytest.approx(1.0)
    assert est["tps"] == pytest.approx(1 / (0.1 + 0.05 * 18))
    assert est["model"] == "llada2-mini-L20-q4_k_m.gguf"


@pytest.mark.parametrize("quant", ["f16", "q8_0"])
def test_synthetic_builder_shapes(quant):
    import gguf

    from converters.llada2 import LLaDA2

    m = build_synthetic("llada2-mini", layers=3, quant=quant, overrides=TINY)
    assert m.path.is_file() and m.path.parent.name == "synthetic" and "-L3-" in m.path.name
    cfg = synthetic_config("llada2-mini", 3, **TINY)
    want = {g: shape for g, (shape, _) in LLaDA2(cfg, ckpt=None).expected().items()}
    r = gguf.GGUFReader(m.path)
    got = {t.name: tuple(int(x) for x in reversed(t.shape)) for t in r.tensors}
    assert got == want
    assert int(r.get_field("llada2.block_count").contents()) == 3
    assert got["blk.1.ffn_gate_exps.weight"] == (16, 32, 64)
    types = {t.name: t.tensor_type.name for t in r.tensors}
    assert types["blk.1.ffn_gate_inp.weight"] == "F32"
    assert types["blk.1.ffn_up_exps.weight"] == ("F16" if quant == "f16" else "Q8_0")
    assert build_synthetic("llada2-mini", layers=3, quant=quant, overrides=TINY).path == m.path  # cached


def test_synthetic_real_shapes_without_writing():
    cfg = synthetic_config("llada2-flash")
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["moe_intermediate_size"]) == (4096, 32, 1024)
    with pytest.raises(UsageError):
        synthetic_config("llada2-huge")


def test_step_and_ar_rows_carry_the_roofline_against_measured_limits(bench_doc):
    """Issue 28: bytes per layer, achieved GB/s and GFLOP/s as fractions of the probed limits, for the step (with
    its measured expert union) and the AR token; the text report prints them with the limits."""
    doc, _ = bench_doc
    m = doc["machine"]
    assert m["read_gbs"] > 0 and m["triad_gbs"] > 0 and "threads" in m["read_probe"]
    assert isinstance(m["threads"]["default_threads"], int) and m["threads"]["wait"]
    rows = {r["test"]: r for r in doc["results"]}
    for test, union_range in (("step@64", (2, 8)), ("ar", (2, 2))):
        r = rows[test]
        rf, moe = r["roofline"], r["moe_layer"]
        t = r["step_s"]["mean"]
        assert rf["achieved_gbs"] == pytest.approx(rf["gbytes"] / t, rel=0.02)
        assert rf["achieved_gflops"] == pytest.approx(rf["gflop"] / t, rel=0.02)
        assert rf["pct_of_bandwidth"] == pytest.approx(100 * rf["achieved_gbs"] / m["read_gbs"], rel=0.02)
        assert rf["pct_of_matmul_peak"] == pytest.approx(100 * rf["achieved_gflops"] / m["matmul_gflops"], rel=0.02)
        assert rf["mbytes_per_layer"] == pytest.approx(1e3 * rf["gbytes"] / 3, rel=0.02)
        assert union_range[0] <= moe["experts"] <= union_range[1]  # top-2 of 8: one token uses exactly 2
        assert moe["floor_ms"] == pytest.approx(moe["mbytes"] / m["read_gbs"], rel=0.02)
    assert rows["step@64"]["roofline"]["gbytes"] > rows["ar"]["roofline"]["gbytes"]  # more experts, 32 KV rows
    text = report.table(doc)
    assert "% read BW" in text and f"read {m['read_gbs']} GB/s" in text
    assert sum(1 for line in text.splitlines() if line.startswith("| ") and "GB/s" not in line
               and ("step@64" in line or "| ar " in line)) >= 4  # main table + roofline table rows
