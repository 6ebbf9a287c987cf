"""Chat: prefill of the last turn with the KV prefix kept from earlier turns (warm) vs from an empty cache (cold).

Runs ``dllm_cli.chat.prefix_reuse_benchmark``: a 4-question conversation with a long system prompt, quality mode,
``--max-tokens`` per answer; the last question's prefill (request to ``StartEvent``) is timed warm, then the cache
is emptied and the same prompt prefilled again. Best of ``--repeats``.

Usage: python benchmarks/chat_prefix_reuse.py [--gguf PATH] [--threads N] [--max-tokens 64] [--repeats 3]
Without ``--gguf`` it converts a tiny random LLaDA2.1 model (4M parameters, f32) into a temp dir.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dllm_cli.chat import prefix_reuse_benchmark  # noqa: E402
from dllm_cli.generate import decode_config, load  # noqa: E402
from dllm_cli.runtime.options import RuntimeOptions  # noqa: E402

SYSTEM = " ".join(["You are a helpful assistant who answers questions about animals, plants and the weather."] * 12)
QUESTIONS = ["What is a fox?", "And a dog? Compare the two in detail.",
             "Which one would make a better pet for a family?", "Summarise everything we talked about."]


def tiny_model(out: Path) -> Path:
    from converters import convert
    from dllm_cli.demo.checkpoint import tiny_config, write_checkpoint

    ckpt = out / "LLaDA2.1-chat-tiny"
    write_checkpoint(ckpt, tiny_config(hidden_size=256, num_hidden_layers=4, intermediate_size=512,
                                       moe_intermediate_size=128, head_dim=32, num_attention_heads=8,
                                       num_key_value_heads=4), seed=3, head_scale=0.05)
    return convert(ckpt, out / "chat-tiny-f32.gguf", outtype="f32", model_version="2.1").path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf", type=Path)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = args.gguf or tiny_model(Path(tmp))
        loaded = load(str(path), RuntimeOptions(threads=args.threads, ctx_size=4096))
        try:
            config = decode_config(loaded.model, "quality", max_tokens=args.max_tokens, seed=0)
            result = prefix_reuse_benchmark(loaded, config, QUESTIONS, system=SYSTEM, repeats=args.repeats)
            result.update(model=path.name, params=loaded.model.n_params, threads=loaded.session.options.n_threads,
                          machine=f"{platform.machine()} {platform.processor() or ''}".strip())
        finally:
            loaded.close()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
