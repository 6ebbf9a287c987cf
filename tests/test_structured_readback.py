"""A constrained step reads the runtime's logits in place (``want_logits="view"``), without copying [n, V] floats.

The decode must not change: against the same decode over owned copies of every step's logits (``want_logits=True``,
what the engine asked for before), every step's canvas, edits and confidences are identical, bit for bit, in
greedy (threshold and editing) and sampling modes, for a JSON Schema and a regex on a random-weight GGUF. The lent
buffer is read-only, so a pick that wrote into it would fail here instead of corrupting the next step.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import pytest

from runtime_marks import needs_runtime

from dllm_cli import constrain
from dllm_cli.decoding import engine
from dllm_cli.decoding.events import StepEvent
from dllm_cli.decoding.stepper import StepOutput, WantLogits
from dllm_cli.generate import decode_config, load

pytestmark = needs_runtime
SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6},
                                           "n": {"type": "integer", "minimum": 0, "maximum": 99},
                                           "ok": {"type": "boolean"}}, "required": ["name", "n"]}


@dataclass
class Recorder:
    """A ``StepModel`` over a session that records each step's ``want_logits`` and, with ``copy``, asks for owned
    logits instead of a view (the pre-view behaviour)."""

    inner: Any
    copy: bool
    asked: list[WantLogits] = field(default_factory=list)

    def __getattr__(self, name: str) -> Any:  # n_vocab, mask_id, eos_id, block_length, n_ctx, cached, edit_ids
        return getattr(self.inner, name)

    def step(self, tokens: Sequence[int], start: int, rows: Sequence[int], want_logits: WantLogits = False,
             attn_block: int | None = None) -> StepOutput:
        self.asked.append(want_logits)
        out = self.inner.step(tokens, start, rows, bool(want_logits) if self.copy else want_logits, attn_block)
        if want_logits and not self.copy:
            assert out.logits is not None and not out.logits.flags.writeable
        return out

    def commit(self, tokens: Sequence[int], start: int) -> None:
        self.inner.commit(tokens, start)

    def rollback(self, pos: int) -> None:
        self.inner.rollback(pos)


@pytest.fixture(scope="module")
def random_model(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A random-weight tiny LLaDA2.1 f32 GGUF (it writes garbage unconstrained) with a session."""
    from converters import convert
    from dllm_cli.demo.checkpoint import tiny_config, write_checkpoint
    from dllm_cli.runtime.options import RuntimeOptions

    d = tmp_path_factory.mktemp("readback")
    write_checkpoint(d / "ckpt", tiny_config(), seed=4)
    path = convert(d / "ckpt", d / "tiny-f32.gguf", outtype="f32", model_version="2.1").path
    loaded = load(str(path), RuntimeOptions(ctx_size=512))
    yield loaded
    loaded.close()


def _steps(loaded: Any, copy: bool, ids: list[int], cfg: Any, c: Any) -> tuple[list[tuple[Any, ...]], Recorder]:
    loaded.session.reset()
    model = Recorder(loaded.session, copy)
    steps = [(e.block, e.step, e.start, e.canvas, e.unmasked, e.edited, e.probs)
             for e in engine.generate(model, ids, cfg, constraint=c) if isinstance(e, StepEvent)]
    return steps, model


@pytest.mark.parametrize("mode,kw", [("quality", {}), ("speed", {}), ("speed", {"editing": False}),
                                     ("speed", {"temperature": 1.0, "top_k": 50, "seed": 7})])
@pytest.mark.parametrize("kind", ["schema", "regex"])
def test_lent_logits_decode_exactly_as_copied_logits(random_model: Any, mode: str, kw: dict[str, Any],
                                                     kind: str) -> None:
    loaded = random_model
    req = constrain.request(schema=SCHEMA) if kind == "schema" else \
        constrain.request(regex_arg=r"[a-z]{2,5}-[0-9]{1,3}( [a-z]{1,4}){0,3}")
    c = constrain.build(loaded.model, req)
    for i in range(2):
        ids = loaded.model.tokenize(f"prompt {i}: write it", special=False)
        cfg = decode_config(loaded.model, mode, max_tokens=32, **kw)
        lent, seen = _steps(loaded, False, ids, cfg, c)
        copied, _ = _steps(loaded, True, ids, cfg, c)
        assert seen.asked and all(a == "view" for a in seen.asked)  # the engine lends, never copies
        assert lent == copied, (mode, kw, kind, i)
        assert any(s[4] for s in lent)  # the decode unmasked something: the comparison is not vacuous


def test_unconstrained_greedy_asks_for_no_logits(random_model: Any) -> None:
    loaded = random_model
    ids = loaded.model.tokenize("prompt", special=False)
    _, seen = _steps(loaded, False, ids, decode_config(loaded.model, "quality", max_tokens=32), None)
    assert seen.asked and not any(seen.asked)
