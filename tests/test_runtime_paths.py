"""Every runtime path against the numpy reference: KV type x flash attention, the default path, and the CLI's --exact.

Bounds are measured (benchmarks/flash_attn.py, docs/PERFORMANCE.md "Default runtime path"): f32 KV is exact with
flash attention on or off (patch 0005 accumulates in f32 and keeps f32 K/V); f16 KV costs ~1e-2 either way. The
checkpoints are the tiny GQA test model and a no-GQA, ``n_group = 1`` one (the shape where unpatched flash
attention was off by 5.0).
"""
from __future__ import annotations

import json
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest

from converters import convert
from dllm_cli.decoding import collect, generate
from dllm_cli.decoding.events import DoneEvent
from dllm_cli.decoding.stepper import ReferenceModel
from dllm_cli.demo.checkpoint import tiny_config, write_checkpoint
from dllm_cli.errors import UsageError
from dllm_cli.generate import decode_config
from dllm_cli.reference import load_gguf
from dllm_cli.runtime import options
from dllm_cli.runtime.model import Model
from dllm_cli.runtime.options import RuntimeOptions, from_flags
from dllm_cli.runtime.session import Session

B = 32
DLLM = str(Path(sys.executable).with_name("dllm"))
NO_GQA = dict(hidden_size=256, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, head_dim=64,
              intermediate_size=512, moe_intermediate_size=128, num_experts=16, num_experts_per_tok=4, n_group=1,
              topk_group=1)
# measured max abs logit error on these checkpoints: f32 <= 1.2e-5, f16 <= 1.3e-2 (bounds keep headroom for
# other CPUs' f16 conversion and summation order)
BOUND = {"f32": 1e-4, "f16": 5e-2}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    d = tmp_path_factory.mktemp("paths")
    write_checkpoint(d / "tiny", tiny_config(), seed=11, head_scale=2.0)
    write_checkpoint(d / "nogqa", tiny_config(**NO_GQA), seed=3, head_scale=4.0)
    write_checkpoint(d / "peaky", tiny_config(), seed=7, head_scale=4.0)
    return {n: convert(d / n, d / f"{n}-f32.gguf", outtype="f32").path for n in ("tiny", "nogqa", "peaky")}


def _errors(path: Path, opts: RuntimeOptions) -> list[float]:
    """Max abs logit error of a half-masked block: first block, and after a 32-token prefix."""
    ref = load_gguf(path, np.float64)
    rng = np.random.default_rng(0)
    out = []
    with Model(path, opts) as m, Session(m, opts) as s:
        for start in (0, B):
            ids = [int(t) for t in rng.integers(0, m.mask_id, size=start + B // 2)] + [m.mask_id] * (B // 2)
            s.reset()
            if start:
                s.commit(ids[:start], 0)
            got = s.step(ids[start:], start, range(B), want_logits=True).logits
            out.append(float(np.abs(got - ref.forward(np.asarray(ids))[start:]).max()))
    return out


@pytest.mark.parametrize("name", ["tiny", "nogqa"])
@pytest.mark.parametrize("kv", ["f32", "f16"])
@pytest.mark.parametrize("fa", [False, True])
def test_each_configuration_is_bounded_against_the_reference(checkpoints, name, kv, fa):
    errs = _errors(checkpoints[name], RuntimeOptions(kv_type=kv, flash_attn=fa, ctx_size=256, threads=2))
    assert max(errs) <= BOUND[kv], (name, kv, fa, errs)


@pytest.mark.parametrize("name", ["tiny", "nogqa"])
def test_flash_attention_honours_the_kv_type(checkpoints, name):
    """Unpatched, FA cast an f32 cache to f16, so f32 KV gave f16's numbers to 4 decimals."""
    f32 = _errors(checkpoints[name], RuntimeOptions(kv_type="f32", flash_attn=True, ctx_size=256, threads=2))
    f16 = _errors(checkpoints[name], RuntimeOptions(kv_type="f16", flash_attn=True, ctx_size=256, threads=2))
    assert max(f32) < 1e-4 < 1e-3 < max(f16)


def _decode_all(path: Path, opts: RuntimeOptions) -> list[tuple[int, ...]]:
    got = []
    with Model(path, opts) as m, Session(m, opts) as s:
        for mode, over in (("quality", {}), ("speed", {}), ("quality", {"editing": False})):
            cfg = decode_config(m, mode, max_tokens=40, stop_ids=(), **over)
            for seed in range(3):
                prompt = [int(t) for t in np.random.default_rng(seed).integers(0, m.mask_id, size=20)]
                s.reset()
                got.append(collect(generate(s, prompt, cfg, rng=np.random.default_rng(0))).ids)
    return got


def test_default_path_gives_the_exact_paths_tokens(checkpoints):
    """>= 99% of greedy decodes (3 models x quality/speed/threshold-only x 3 prompts) equal the exact path's."""
    same = total = 0
    for path in checkpoints.values():
        exact = _decode_all(path, RuntimeOptions(**{**options.EXACT.__dict__, "ctx_size": 512, "threads": 2}))
        default = _decode_all(path, from_flags(ctx_size=512, threads=2))
        same += sum(a == b for a, b in zip(default, exact))
        total += len(exact)
    assert total == 27 and same / total >= 0.99, f"{same}/{total}"


def test_from_flags():
    assert from_flags() == RuntimeOptions(kv_type=options.DEFAULT_KV_TYPE, flash_attn=None)
    assert from_flags(exact=True) == RuntimeOptions(kv_type="f32", flash_attn=False)
    assert from_flags(exact=True, kv_type="f32", flash_attn="off").flash_attn is False
    assert from_flags(kv_type="f16", flash_attn="on") == RuntimeOptions(kv_type="f16", flash_attn=True)
    for bad in ({"exact": True, "kv_type": "f16"}, {"exact": True, "flash_attn": "on"}, {"flash_attn": "maybe"},
                {"exact": True, "kv_type": "q8_0"}):
        with pytest.raises(UsageError):
            from_flags(**bad)


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([DLLM, "run", *args], capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("flags", [["--exact"], [], ["--flash-attn", "on"], ["--kv-type", "f32", "--flash-attn", "off"]])
@pytest.mark.parametrize("mode", ["quality", "speed"])
def test_cli_paths_decode_like_the_reference(checkpoints, flags, mode):
    """`dllm run --exact` (and the default path) give the reference engine's tokens for the same prompt."""
    path = checkpoints["peaky"]
    res = _run(str(path), "Sort 3 1 2 and tell me about the fox.", "--mode", mode, "--json", "--max-tokens", "64",
               "--threads", "2", *flags)
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    want = _reference_decode(path, mode, tuple(doc["prompt_tokens"]))
    assert doc["tokens"] == list(want.ids) and doc["forwards"] == want.forwards


@lru_cache(maxsize=None)
def _reference_decode(path: Path, mode: str, prompt: tuple[int, ...]) -> DoneEvent:
    with Model(path, options.EXACT) as m:
        cfg = decode_config(m, mode, max_tokens=64)
        return collect(generate(ReferenceModel(load_gguf(path, np.float64), eos_id=m.eos_id, n_ctx=4096), prompt, cfg))


@pytest.mark.parametrize("flags", [["--exact", "--kv-type", "f16"], ["--exact", "--flash-attn", "on"],
                                   ["--flash-attn", "sometimes"], ["--kv-type", "f8"]])
def test_contradicting_runtime_flags_are_usage_errors(checkpoints, flags):
    res = _run(str(checkpoints["tiny"]), "hi", *flags)
    assert res.returncode == 2 and res.stdout == ""
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
