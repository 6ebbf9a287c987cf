"""Q6_K weights on x86 go through the repacked 8-row kernels of patch 0007 (``ggml_gemm_q6_K_8x8_q8_K`` for 4-row
groups, ``ggml_gemv_q6_K_8x8_q8_K`` for the remainder rows and for every MUL_MAT_ID expert row): the repacked model
must give the same logits as the same file loaded without repacking (llama.cpp's row-by-row vec_dot).

Why this proves the kernels ran: the load log shows a CPU_REPACK buffer holding exactly the bytes of the Q6_K
matrices (before patch 0007 x86 never repacked Q6_K, so that buffer did not exist for this file); weights in that
buffer are interleaved 8 rows at a time, so only the repack kernels can compute with them, and any other kernel
would give garbage rather than logits equal to the unrepacked path's. Both paths multiply the same 6-bit and 8-bit
integers exactly and differ only in float summation order (measured here: max |delta logit| ~1e-6 with logits of
magnitude ~10).
"""
from __future__ import annotations

import re
from dataclasses import replace

import numpy as np
import pytest

from converters import convert
from dllm_cli.demo.checkpoint import tiny_config, write_checkpoint
from dllm_cli.runtime import options
from ggml_patch import cpu_features
from runtime_marks import needs_runtime

pytestmark = [
    needs_runtime,
    pytest.mark.skipif("avx2" not in cpu_features.host_features(),
                       reason="the repacked Q6_K kernels are selected only on CPUs with AVX2"),
]

OPTS = replace(options.EXACT, ctx_size=256, ubatch=256, threads=2)
ROWS = (1, 3, 4, 5, 32)    # gemv only; gemv x3; one gemm group; gemm + 1 gemv; 8 gemm groups
TOL = 1e-3                 # absolute, on logits of magnitude ~10 (measured max ~1e-6)
_BUFFER = re.compile(r"CPU_REPACK model buffer size =\s*([0-9.]+) MiB")


@pytest.fixture(scope="module")
def q6k(tmp_path_factory):
    """A 3-layer MoE LLaDA2 (1 dense layer, 8 experts, top-2) 256 wide, every matrix but attn_qkv (Q8_0) Q6_K, vocab a multiple of 8
    (so the output head is repacked too)."""
    from dllm_cli.runtime.quantize import quantize

    d = tmp_path_factory.mktemp("q6k")
    cfg = tiny_config(hidden_size=256, intermediate_size=512, moe_intermediate_size=256, head_dim=64)
    vocab = write_checkpoint(d / "probe", cfg)["vocab_size"]
    write_checkpoint(d / "ckpt", cfg, seed=5, head_scale=2.0, vocab_pad=13 + (-vocab) % 8)
    f32 = convert(d / "ckpt", d / "m-f32.gguf", outtype="f32").path
    return quantize(f32, d / "m-q6_k.gguf", "q6_k")


def repacked_bytes(path) -> tuple[int, int]:
    """(bytes, count) of the Q6_K matrices llama.cpp can repack: every matmul weight with a multiple of 8 rows
    (token_embd feeds GET_ROWS, so it stays in the plain CPU buffer)."""
    import gguf

    tensors = [t for t in gguf.GGUFReader(path).tensors
               if t.tensor_type == gguf.GGMLQuantizationType.Q6_K and t.name != "token_embd.weight"]
    assert tensors and all(int(t.shape[1]) % 8 == 0 for t in tensors)
    return sum(int(t.n_bytes) for t in tensors), len(tensors)


def load(path, repack: bool):
    from dllm_cli.runtime.library import captured_log
    from dllm_cli.runtime.model import Model

    with captured_log() as log:
        model = Model(path, replace(OPTS, repack=repack))
    return model, "".join(log)


def logits_per_batch(model) -> dict[int, np.ndarray]:
    """Logits of every row of a step of n tokens after a committed 32-token prompt, for n in ROWS."""
    from dllm_cli.runtime.session import Session

    rng = np.random.default_rng(1)
    ids = list(rng.integers(0, model.mask_id, size=64))
    out = {}
    with Session(model, OPTS) as s:
        s.commit(ids[:32], 0)
        for n in ROWS:
            step = ids[32:32 + n - 1] + [model.mask_id]
            out[n] = s.step(step, 32, range(n), want_logits=True).logits
    return out


def test_q6k_file_is_repacked_and_matches_the_row_kernels(q6k):
    import gguf

    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(q6k).tensors}
    assert types["output.weight"] == types["blk.1.ffn_down_exps.weight"] == types["blk.0.attn_output.weight"] == "Q6_K"
    want, count = repacked_bytes(q6k)
    on, log_on = load(q6k, repack=True)
    off, log_off = load(q6k, repack=False)
    try:
        found = _BUFFER.findall(log_on)
        assert found, "no CPU_REPACK buffer: the Q6_K weights were not repacked (is patch 0007 built?)"
        # the buffer holds exactly the Q6_K matrices (2-decimal MiB in the log, plus per-tensor alignment)
        assert abs(float(found[0]) * 2**20 - want) <= 0.005 * 2**20 + 64 * count, (found, want)
        assert "CPU_REPACK" not in log_off
        got, ref = logits_per_batch(on), logits_per_batch(off)
    finally:
        on.close()
        off.close()
    for n in ROWS:
        scale = np.abs(ref[n]).max()
        assert 1.0 < scale < 100.0
        assert np.abs(got[n] - ref[n]).max() < TOL, (n, np.abs(got[n] - ref[n]).max())
        assert (got[n].argmax(axis=1) == ref[n].argmax(axis=1)).all(), n
