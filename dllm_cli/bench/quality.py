"""Size and quality of quantized files against a reference file (f16/f32) of the same weights.

For each prompt the prefix is committed and one 32-token step (the first generated block, all masks) is
decoded with raw logits for every row; the quantized logits are compared with the reference's: max and mean
absolute error and greedy-argmax agreement (mask token excluded).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from dllm_cli.errors import UsageError
from dllm_cli.runtime.model import Model, inspect_gguf
from dllm_cli.runtime.options import RuntimeOptions
from dllm_cli.runtime.session import Session


def block_logits(path: str | Path, prompts: Sequence[str], opts: RuntimeOptions) -> tuple[list[np.ndarray], int, int]:
    """Logits ``[B, V]`` of the first generated block per prompt, the file's size and its mask id."""
    with Model(path, opts) as model, Session(model, opts, device_confidence=False) as s:
        B = s.block_length
        out = []
        for text in prompts:
            ids = model.tokenize(text, special=True)
            k = len(ids) // B * B
            s.reset()
            if k:
                s.commit(ids[:k], 0)
            block = ids[k:] + [model.mask_id] * (B - (len(ids) - k))
            res = s.step(block, k, range(B), want_logits=True)
            out.append(np.asarray(res.logits, np.float32))  # [B, V]
        return out, model.size_bytes, model.mask_id


def vocabulary(path: str | Path) -> tuple[int, str]:
    """(mask id, digest of the token texts) of a GGUF, validated first (ModelError naming the file)."""
    import hashlib

    from gguf import GGUFReader

    info = inspect_gguf(Path(path))
    field = GGUFReader(path, "r").get_field("tokenizer.ggml.tokens")
    assert field is not None  # inspect_gguf checked it
    digest = hashlib.sha256(b"\0".join(bytes(field.parts[i]) for i in field.data)).hexdigest()
    return info.meta.mask_id, digest


def check_comparable(reference: str | Path, candidates: Sequence[str | Path]) -> None:
    """Refuse, before any measurement, a candidate whose vocabulary differs from the reference's: its logits
    would not line up column for column (a UsageError naming both files)."""
    ref = vocabulary(reference)
    for path in candidates:
        if vocabulary(path) != ref:
            raise UsageError(f"--quality-vs {Path(reference).name}: {Path(path).name} has another vocabulary, "
                             "so their logits cannot be compared", "compare quantizations of the same model only")


def compare_quality(reference: str | Path, candidates: Sequence[str | Path], prompts: Sequence[str], *,
                    threads: int | None = None, progress: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """One entry per candidate: size, bits per weight, logit error and argmax agreement vs ``reference``."""
    say = progress or (lambda _m: None)
    opts = RuntimeOptions(threads=threads, ctx_size=4096, kv_type="f32", flash_attn=False, ubatch=4096)
    say(f"quality reference {Path(reference).name}")
    ref, ref_size, mask = block_logits(reference, prompts, opts)
    rows = []
    for path in candidates:
        say(f"quality {Path(path).name}")
        got, size, _ = block_logits(path, prompts, opts)
        err = np.concatenate([np.abs(g - r).max(axis=1) for g, r in zip(got, ref)])  # [n_prompts * B]
        mean = float(np.mean([np.abs(g - r).mean() for g, r in zip(got, ref)]))
        agree = []
        for g, r in zip(got, ref):
            g, r = g.copy(), r.copy()
            g[:, mask] = r[:, mask] = -np.inf
            agree.append(np.argmax(g, 1) == np.argmax(r, 1))
        rows.append({"path": str(path), "reference": str(reference), "size_bytes": size,
                     "size_vs_reference": round(size / ref_size, 4), "rows": int(err.size),
                     "logit_max_abs_err": round(float(err.max()), 4),
                     "logit_p50_row_max_err": round(float(np.median(err)), 4),
                     "logit_mean_abs_err": round(mean, 5),
                     "argmax_agreement": round(float(np.concatenate(agree).mean()), 4)})
    return rows


def reference_errors(path: str | Path, opts: RuntimeOptions, prefixes: Sequence[int] = (0, 32),
                     seed: int = 0) -> list[float]:
    """Max abs logit error of the runtime under ``opts`` against the float64 numpy reference, one per prefix.

    For each prefix length (a multiple of the block length) random ids are committed, then a block that is half
    random ids and half masks is stepped with logits for every row. Raises whatever loading raises.
    """
    from dllm_cli.reference import load_gguf

    ref = load_gguf(path, np.float64)
    rng = np.random.default_rng(seed)
    out = []
    with Model(path, opts) as m, Session(m, opts) as s:
        B = s.block_length
        for start in prefixes:
            ids = [int(t) for t in rng.integers(0, m.mask_id, size=start + B // 2)] + [m.mask_id] * (B // 2)
            s.reset()
            if start:
                s.commit(ids[:start], 0)
            got = s.step(ids[start:], start, range(B), want_logits=True).logits  # [B, V]
            out.append(float(np.abs(got - ref.forward(np.asarray(ids))[start:]).max()))
    return out
