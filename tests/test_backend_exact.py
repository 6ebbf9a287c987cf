"""A GPU backend against the numpy reference and the CPU runtime, every layer offloaded (issue 27).

Written once for any backend: ``DLLM_TEST_BACKEND`` names it. CI runs it on Mesa's software lavapipe
(``.ci/vulkan``; ``make vulkan-test`` by hand), ``make gpu-check BACKEND=cuda`` on a lent NVIDIA GPU; without the
variable the module skips with the reason. Each backend runs in a child process (``backend_worker.py``:
llama-cpp-python binds one library per process), all jobs in one go so that the device starts once; the CPU
runtime runs the same jobs in another child.

Checked, with f32 weights, f32 KV and flash attention off unless said otherwise:
* logits within ``TOL`` of the float64 reference: prefill of 1/33/300 tokens, steps after commits over several
  blocks, a LLaDA2.2 checkpoint (block routing), an ``n_group = 1`` checkpoint;
* every layer on the device (llama.cpp's "offloaded N/N layers") and the graph splits recorded;
* greedy ids, forwards and edits identical to the CPU runtime's: 2.1 speed and quality, 2.0 threshold
  decoding, 2.2 speed and quality with inserts and deletes;
* quantized files (q8_0, q4_k_m): logits within ``QUANT_TOL`` of the float64 reference of the dequantized weights;
  greedy ids, forwards and edits identical to the CPU runtime's on the demo model quantized to q8_0 (a trained
  model: the random tiny files are no token target, see ``QUANT_TOL``);
* half the layers offloaded (``-ngl``): the same ids, logits within ``TOL``;
* flash attention on: logits within ``FA_TOL`` of the reference (the figure that picks the default).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from converters import convert
from dllm_cli.demo.checkpoint import tiny_config, write_checkpoint
from dllm_cli.reference import load_gguf
from dllm_cli.registry import embedded_model_path
from test_llada22 import write_llada22

BACKEND = os.environ.get("DLLM_TEST_BACKEND", "vulkan")
ROOT = Path(__file__).resolve().parents[1]
REAL_HOME = Path(os.environ.get("DLLM_HOME") or Path.home() / ".cache" / "dllm")
B = 32
TOL = 1e-4        # max abs logit error vs the float64 reference (f32 weights, f32 KV, FA off)
FA_TOL = 1e-4     # the same with flash attention on
# Quantized files: max abs logit error vs the float64 reference of the dequantized weights. Measured on lavapipe
# (Mesa 25.0.7): q8_0 0.054-0.17, q4_k_m 0.054-0.14 (ggml-vulkan's speed path for quantized weights: f16 shared
# memory and f16 accumulators); 1e-5 with GGML_VK_DISABLE_F16=1. The CPU runtime on the same files is 0.12-8.3 from
# that reference (it quantizes activations to q8 and these random MoE routers flip near ties), so its tokens are no
# target on them; docs/PERFORMANCE.md, "Vulkan on lavapipe". Per backend: another backend's quantized path (CUDA
# quantizes activations to q8_1, like the CPU) gets its own bound once measured; until then the test reports its
# figures and skips.
QUANT_TOL = {"vulkan": 0.3}
# a cold lavapipe compiles every pipeline first (tens of minutes on 2 busy cores); warm, seconds
WORKER_TIMEOUT = float(os.environ.get("DLLM_TEST_WORKER_TIMEOUT", "5400"))


def _why_not() -> str | None:
    """Why ``BACKEND`` cannot run here (not asked for, no build, no device), or None."""
    from dllm_cli.errors import RuntimeMissingError

    if "DLLM_TEST_BACKEND" not in os.environ:
        return ("set DLLM_TEST_BACKEND=vulkan|cuda to run these (make vulkan-test on lavapipe, make gpu-check; CI "
                "runs them in .ci/vulkan)")
    from dllm_cli.runtime.library import check

    try:
        check(BACKEND)
    except RuntimeMissingError as e:
        return f"no {BACKEND} runtime: {e} (make gpu-check BACKEND={BACKEND} builds it)"
    if BACKEND == "vulkan":
        from ggml_patch import vulkan_devices
        if not vulkan_devices.probe():
            return "no Vulkan device (install the lavapipe of .ci/run: python -m ggml_patch.lavapipe install)"
    return None


def worker_env(backend: str) -> dict[str, str]:
    """The child's environment: its backend, and for Vulkan the private Mesa 25 lavapipe where the machine has no
    Vulkan GPU, with Mesa's shader cache in the real ``DLLM_HOME`` (tests get a fresh one each)."""
    env = {**os.environ, "DLLM_BACKEND": backend, "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}"}
    if backend == "vulkan":
        from ggml_patch import lavapipe
        lavapipe.select(env, REAL_HOME / "lavapipe")
        env.setdefault("MESA_SHADER_CACHE_DIR", str(REAL_HOME / "mesa-shader-cache"))
    return env


if BACKEND == "vulkan" and "VK_ICD_FILENAMES" not in os.environ:
    os.environ.update({k: v for k, v in worker_env("vulkan").items() if k == "VK_ICD_FILENAMES"})
WHY_NOT = _why_not()
pytestmark = pytest.mark.skipif(WHY_NOT is not None, reason=str(WHY_NOT))


def run_worker(backend: str, jobs: list[dict], tmp: Path) -> dict:
    (tmp / f"{backend}-jobs.json").write_text(json.dumps(jobs))
    out = tmp / f"{backend}-out.npz"
    res = subprocess.run([sys.executable, str(ROOT / "tests" / "backend_worker.py"), str(tmp / f"{backend}-jobs.json"),
                          str(out)], env=worker_env(backend), capture_output=True, text=True, timeout=WORKER_TIMEOUT)
    assert res.returncode == 0, f"{backend} worker failed: {res.stderr[-2000:]}"
    with np.load(out) as z:
        return {k: (json.loads(bytes(z[k]).decode()) if k.endswith(".json") else z[k]) for k in z.files}


def window(rng, P, mask_id):
    W = (P // B + 1) * B
    return [int(t) for t in rng.integers(0, mask_id, size=P)] + [mask_id] * (W - P)


def logit_seqs(mask_id: int, seed: int) -> list[dict]:
    """Prefill of 1, 33 and 300 tokens, and a block stepped after three committed blocks, partly unmasked."""
    rng = np.random.default_rng(seed)
    seqs = []
    for P in (1, 33, 300):
        ids = window(rng, P, mask_id)
        s = (P // B) * B
        seqs.append({"commits": [[ids[:s], 0]] if s else [], "step": [ids[s:], s]})
    ids = [int(t) for t in rng.integers(0, mask_id, size=3 * B)] + [mask_id] * B
    for i in rng.choice(range(3 * B, 4 * B), size=9, replace=False):
        ids[int(i)] = int(rng.integers(0, mask_id))
    seqs.append({"commits": [[ids[k * B:(k + 1) * B], k * B] for k in range(3)], "step": [ids[3 * B:], 3 * B]})
    return seqs


def full_ids(seq: dict) -> list[int]:
    ids: list[int] = []
    for part, _ in seq["commits"]:
        ids += part
    return ids + seq["step"][0]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from dllm_cli.runtime.quantize import quantize

    d = tmp_path_factory.mktemp("gpu-models")
    write_checkpoint(d / "m21", tiny_config(), seed=11, head_scale=2.0)
    write_checkpoint(d / "g1", tiny_config(n_group=1, topk_group=1, num_key_value_heads=4), seed=12, head_scale=2.0)
    write_llada22(d / "LLaDA2.2-tiny", edit_boost=3.0)
    cfg = tiny_config(hidden_size=256, intermediate_size=512, moe_intermediate_size=256, head_dim=64)
    write_checkpoint(d / "q", cfg, seed=4, head_scale=2.0)
    out = {"2.1": convert(d / "m21", d / "m21.gguf", outtype="f32").path,
           "n_group=1": convert(d / "g1", d / "g1.gguf", outtype="f32").path,
           "2.2": convert(d / "LLaDA2.2-tiny", d / "m22.gguf", outtype="f32").path,
           "q8_0": convert(d / "q", d / "q-q8_0.gguf", outtype="q8_0").path}
    out["q4_k_m"] = quantize(convert(d / "q", d / "q-f32.gguf", outtype="f32").path, d / "q-q4_k_m.gguf", "q4_k_m")
    out["demo-q8_0"] = quantize(embedded_model_path(), d / "demo-q8_0.gguf", "q8_0")
    return {k: str(v) for k, v in out.items()}


PROMPTS = {"2.1": [(7, 11), (40, 12)], "2.2": [(7, 13), (40, 14)]}
DECODES = [("2.1", "speed", "2.1"), ("2.1", "quality", "2.1"), ("2.1", "quality", "2.0"),
           ("2.2", "speed", "2.2"), ("2.2", "quality", "2.2")]
QUESTIONS = ["What is 93 minus 76?", "Reverse: 8 9 5 8 2 9", "Describe Peru."]  # the demo model's tasks


def build_jobs(models: dict, mask: dict) -> tuple[list[dict], dict]:
    """The jobs and where each result lands: ``index[name] = job number``."""
    jobs: list[dict] = []
    index: dict = {}

    def add(name, job):
        index[name] = len(jobs)
        jobs.append(job)

    for name in ("2.1", "n_group=1", "2.2", "q8_0", "q4_k_m"):
        add(("logits", name), {"kind": "logits", "model": models[name], "seqs": logit_seqs(mask[name], 1)})
    add(("logits-fa", "2.1"), {"kind": "logits", "model": models["2.1"], "flash": True,
                               "seqs": logit_seqs(mask["2.1"], 1)})
    add(("logits-half", "2.1"), {"kind": "logits", "model": models["2.1"], "ngl": 2,
                                 "seqs": logit_seqs(mask["2.1"], 1)})
    for mode in ("speed", "quality"):
        for q in QUESTIONS:
            add(("demo", mode, q), {"kind": "decode", "model": models["demo-q8_0"], "question": q, "mode": mode,
                                    "version": "2.1", "max_tokens": 48, "ngl": None})
    for name, mode, version in DECODES + [("2.1-half", "speed", "2.1")]:
        model = name.removesuffix("-half")
        for n, seed in PROMPTS[model]:
            prompt = [int(t) for t in np.random.default_rng(seed).integers(0, 250, size=n)]
            add(("decode", name, mode, version, n), {"kind": "decode", "model": models[model], "prompt": prompt,
                                                      "mode": mode, "version": version, "max_tokens": 48,
                                                      "ngl": 2 if name.endswith("-half") else None})
    return jobs, index


@pytest.fixture(scope="module")
def runs(models, tmp_path_factory):
    """(jobs, index, cpu results, backend results) for the whole module."""
    mask = {name: int(load_gguf(path).cfg.mask_id) for name, path in models.items() if not name.startswith("demo")}
    jobs, index = build_jobs(models, mask)
    tmp = tmp_path_factory.mktemp("gpu-runs")
    return jobs, index, run_worker("cpu", jobs, tmp), run_worker(BACKEND, jobs, tmp)


def reference_errors(job: dict, got: dict, n: int) -> list[float]:
    ref = load_gguf(job["model"], np.float64)
    errs = []
    for i, seq in enumerate(job["seqs"]):
        ids = full_ids(seq)
        start = seq["step"][1]
        want = ref.forward(np.asarray(ids))[start:start + len(seq["step"][0])]
        errs.append(float(np.abs(got[f"{n}.{i}"] - want).max()))
    return errs


def test_every_layer_runs_on_the_device(runs):
    jobs, index, _, gpu = runs
    meta = gpu["meta.json"]
    assert meta["backend"] == BACKEND
    assert any(d["type"] == "gpu" for d in meta["devices"]), meta["devices"]
    for n, job in enumerate(jobs):
        done, total = meta["jobs"][n]["offloaded"]
        if job.get("ngl") is None:
            assert done == total, f"job {n}: {done}/{total} layers offloaded"
        else:
            assert done == job["ngl"] < total
    full = [meta["jobs"][index[("logits", name)]]["splits"] for name in ("2.1", "2.2", "q4_k_m")]
    half = meta["jobs"][index[("logits-half", "2.1")]]["splits"]
    print(f"{BACKEND}: devices {[d['name'] for d in meta['devices']]}; graph splits (2.1, 2.2, q4_k_m) {full}, "
          f"half offloaded {half}")
    # the token-embedding lookup stays on the CPU (llama.cpp keeps it there): one CPU split, one device split
    assert all(s and max(s) <= 2 for s in full), full


@pytest.mark.parametrize("name", ["2.1", "n_group=1", "2.2"])
def test_logits_match_the_reference(runs, name):
    jobs, index, _, gpu = runs
    n = index[("logits", name)]
    errs = reference_errors(jobs[n], gpu, n)
    print(f"{BACKEND} {name}: max abs logit error per sequence {['%.2e' % e for e in errs]}")
    assert max(errs) < TOL, errs


def test_flash_attention_error_against_the_reference(runs):
    jobs, index, _, gpu = runs
    n = index[("logits-fa", "2.1")]
    errs = reference_errors(jobs[n], gpu, n)
    print(f"{BACKEND} flash attention on: max abs logit error per sequence {['%.2e' % e for e in errs]}")
    assert max(errs) < FA_TOL, errs


def test_half_the_layers_offloaded_matches(runs):
    jobs, index, cpu, gpu = runs
    n = index[("logits-half", "2.1")]
    errs = reference_errors(jobs[n], gpu, n)
    assert max(errs) < TOL, errs


@pytest.mark.parametrize("name", ["q8_0", "q4_k_m"])
def test_quantized_logits_are_within_the_measured_bound(runs, name):
    jobs, index, cpu, gpu = runs
    n = index[("logits", name)]
    errs = reference_errors(jobs[n], gpu, n)
    print(f"{BACKEND} {name}: max abs logit error vs the dequantized reference {['%.2e' % e for e in errs]} "
          f"(CPU runtime: {['%.2e' % e for e in reference_errors(jobs[n], cpu, n)]})")
    assert len(errs) == 4
    if BACKEND not in QUANT_TOL:
        pytest.skip(f"no measured bound for {BACKEND} yet: errors {errs} (pin one in QUANT_TOL)")
    assert max(errs) < QUANT_TOL[BACKEND], errs


@pytest.mark.parametrize("mode", ["speed", "quality"])
def test_quantized_demo_model_decodes_like_the_cpu_runtime(runs, mode):
    _, index, cpu, gpu = runs
    for q in QUESTIONS:
        k = f"{index[('demo', mode, q)]}.json"
        assert gpu[k] == cpu[k], q
        assert len(cpu[k]["ids"]) > 0


@pytest.mark.parametrize("name, mode, version", DECODES + [("2.1-half", "speed", "2.1")])
def test_greedy_decoding_matches_the_cpu_runtime(runs, name, mode, version):
    _, index, cpu, gpu = runs
    fired = [0, 0, 0]
    for n, _ in PROMPTS[name.removesuffix("-half")]:
        k = f"{index[('decode', name, mode, version, n)]}.json"
        assert gpu[k] == cpu[k], f"prompt of {n} tokens"
        fired = [fired[0] + cpu[k]["edits"], fired[1] + cpu[k]["inserts"], fired[2] + cpu[k]["deletes"]]
    if version == "2.2":
        assert fired[1] > 0 and fired[2] > 0, f"inserts and deletes must fire for the check to mean anything: {fired}"
