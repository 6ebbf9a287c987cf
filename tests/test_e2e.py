"""End to end: the decoding engine on the patched runtime gives exactly the tokens the same engine gives on
the numpy reference (f32 GGUF, f32 KV cache), in speed, quality and LLaDA2.0 threshold mode; a reused chat
prefix gives the same tokens as a cold run. The lm_head is scaled so thresholds and edits really fire.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from converters import convert
from dllm_cli.decoding import collect, generate, make_config
from dllm_cli.decoding.events import StepEvent
from dllm_cli.decoding.stepper import ReferenceModel
from dllm_cli.demo.checkpoint import tiny_config, write_checkpoint
from dllm_cli.reference import load_gguf
from dllm_cli.runtime.model import Model
from dllm_cli.runtime import options
from dllm_cli.runtime.session import Session

EXACT = replace(options.EXACT, ctx_size=512, threads=2)


@pytest.fixture(scope="module")
def peaky(tmp_path_factory):
    d = tmp_path_factory.mktemp("e2e")
    write_checkpoint(d / "ckpt", tiny_config(), seed=7, head_scale=4.0)
    path = convert(d / "ckpt", d / "peaky-f32.gguf", outtype="f32").path
    model = Model(path, EXACT)
    yield model, load_gguf(path, np.float64)
    model.close()


def steps(events):
    return [(e.block, e.step, e.unmasked, e.edited) for e in events if isinstance(e, StepEvent)]


@pytest.mark.parametrize("mode,version", [("speed", "2.1"), ("quality", "2.1"), ("quality", "2.0")])
def test_runtime_and_reference_decode_identically(peaky, mode, version):
    model, ref = peaky
    prompt = model.tokenize(model.render_chat([{"role": "user", "content": "Sort 3 1 2 and tell me about the fox."}]))
    config = make_config(mode, version, max_tokens=96, stop_ids=model.stop_ids)
    with Session(model, EXACT) as session:
        got = list(generate(session, prompt, config))
    want = list(generate(ReferenceModel(ref, eos_id=model.eos_id, n_ctx=512), prompt, config))
    assert steps(got) == steps(want)
    a, b = collect(got), collect(want)
    assert a.ids == b.ids and a.forwards == b.forwards and a.edits == b.edits
    assert len(a.ids) > 3
    if version == "2.1":
        assert a.edits > 0, "the scaled head must make T2T edits fire"
        assert any(len(e.unmasked) > 1 for e in got if isinstance(e, StepEvent)), "parallel unmasking must happen"
    else:
        assert a.edits == 0


def test_reused_prefix_gives_the_cold_run_tokens(peaky):
    model, _ = peaky
    config = make_config("quality", "2.1", max_tokens=64, stop_ids=model.stop_ids)
    turn1 = [{"role": "user", "content": "Copy: banana banana banana banana"}]
    with Session(model, EXACT) as warm:
        first = collect(generate(warm, model.tokenize(model.render_chat(turn1)), config))
        turn2 = turn1 + [{"role": "assistant", "content": model.detokenize(list(first.ids))},
                         {"role": "user", "content": "And now reverse the word hello."}]
        ids2 = model.tokenize(model.render_chat(turn2))
        again = collect(generate(warm, ids2, config))
    with Session(model, EXACT) as cold:
        fresh = collect(generate(cold, ids2, config))
    assert again.reused >= 32 and fresh.reused == 0
    assert again.ids == fresh.ids and again.forwards == fresh.forwards
