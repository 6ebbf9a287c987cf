"""Train the embedded demo model: a tiny LLaDA2.1 on synthetic chat tasks, offline and seeded.

    python -m dllm_cli.demo.train --out DIR [--init CKPT] [--steps N] [--seed S] [--threads T] [--families F]

Writes ``DIR/LLaDA2.1-demo`` (an HF LLaDA2 checkpoint through ``write_checkpoint``) and, when the converter is
available, ``DIR/demo.gguf`` (f32). Objective (LLaDA2 block diffusion, spec §3.4/§5): each example is a
chat-templated prompt + answer + ``<|role_end|>`` padded with ``<|endoftext|>`` to whole 32-token blocks.
One answer block k is drawn per example; the input is the clean sequence up to block k with block k
noised (``noise.Noiser``: answer positions masked at a per-block ratio t ~ U(0.02, 1), some of the remaining
answer tokens replaced by wrong tokens), under the block-causal mask — exactly the attention pattern of inference.
Loss: cross-entropy on masked and corrupted positions (weight 1) and on untouched answer tokens of the
block (weight 0.3, so the model learns to keep correct tokens). Needs the ``[train]`` extra (torch).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dllm_cli.demo import tasks
from dllm_cli.demo.bpe import BPE
from dllm_cli.demo.checkpoint import tiny_config, write_checkpoint
from dllm_cli.demo.evaluate import evaluate, format_score
from dllm_cli.demo.noise import Noiser, answer_pool
from dllm_cli.demo.tokenizer import train_bpe
from dllm_cli.demo.torch_model import LLaDA2, block_causal

B = tasks.BLOCK_LENGTH
N_MERGES = 300
VOCAB_PAD = 6
MODEL = dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
             intermediate_size=384, moe_intermediate_size=128, num_experts=8, num_experts_per_tok=2,
             num_shared_experts=1, n_group=2, topk_group=1, routed_scaling_factor=2.5,
             max_position_embeddings=4096, _name_or_path="dllm/LLaDA2.1-demo", initializer_range=0.02)
CHECKPOINT_DIR = "LLaDA2.1-demo"  # also the GGUF's general.name


def make_batch(noiser: Noiser, stream, rng: np.random.Generator, size: int):
    """Windows grouped by length: {W: (x [n, W], y [n, W], w [n, W])}."""
    groups: dict[int, list] = {}
    for _ in range(size):
        full, p_len, alt = noiser.encode(next(stream), rng)
        x, y, wt = noiser.window(rng, full, p_len, alt)
        groups.setdefault(len(x), []).append((x, y, wt))
    return {w: tuple(torch.from_numpy(np.stack(c)) for c in zip(*g)) for w, g in groups.items()}


def lr_at(step: int, steps: int, peak: float, warmup: int = 200) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    frac = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))


def load_init(ckpt: Path) -> tuple[list[tuple[str, str]], dict, dict]:
    """Merges, config and weights of a checkpoint written by a previous stage (``--init``)."""
    from converters.safetensors import Checkpoint
    tok = json.loads((ckpt / "tokenizer.json").read_text())
    merges = [tuple(m.split(" ", 1)) for m in tok["model"]["merges"]]
    cfg = json.loads((ckpt / "config.json").read_text())
    ck = Checkpoint(ckpt)
    return merges, cfg, {n: torch.from_numpy(np.array(ck.get(n), dtype=np.float32)) for n in ck.names()}


def train(out: Path, *, steps: int, minutes: float, seed: int, batch: int, lr: float, init: Path | None = None,
          extra_weight: float = 1.0, families: str = "short", history_rate: float = 0.0, log_every: int = 50,
          weights: dict[str, float] | None = None):
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    if init is None:
        merges = train_bpe(tasks.tokenizer_corpus(seed), N_MERGES)
        bpe = BPE(merges)
        cfg = tiny_config(**MODEL, vocab_size=len(bpe.vocab) + VOCAB_PAD, pad_token_id=bpe.token_id("<|endoftext|>"))
        model = LLaDA2({**cfg, "block_length": B})
    else:  # continue a previous stage: its tokenizer, config and weights (expert bias included)
        if init.suffix == ".gguf":  # a shipped f32 GGUF: rebuild the checkpoint it was converted from (exact)
            from dllm_cli.demo.checkpoint import checkpoint_from_gguf
            checkpoint_from_gguf(init, out / "init", MODEL)
            init = out / "init"
        merges, cfg, state = load_init(init)
        bpe = BPE(merges)
        model = LLaDA2({**cfg, "block_length": B})
        model.load_state_dict(state, strict=True)
    noiser = Noiser(bpe, np.empty(0, dtype=np.int64))
    mix = tasks.FAMILIES[families]
    noiser.answer_ids = answer_pool(noiser, seed + 1, mix)
    mix_weights = tasks.WEIGHTS.get(families)
    if weights:  # --weights overrides some families' sampling weights
        mix_weights = {**(mix_weights or {}), **weights}
    stream = tasks.stream(seed + 2, extra_weight, mix, history_rate, mix_weights)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    other = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": other, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.98))
    n_params = sum(p.numel() for p in model.parameters())
    print(f"params {n_params} vocab {cfg['vocab_size']} steps {steps} batch {batch}", file=sys.stderr)
    t0, ema = time.time(), None
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr)
        groups = make_batch(noiser, stream, rng, batch)
        opt.zero_grad(set_to_none=True)
        total_w = sum(float(w.sum()) for _, _, w in groups.values())
        loss_sum = 0.0
        for wlen, (x, y, wt) in groups.items():
            logits = model(x, block_causal(wlen, B))
            ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="none")
            loss = (ce * wt.reshape(-1)).sum() / total_w
            loss.backward()
            loss_sum += float(loss.detach())
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        model.update_expert_bias(1e-3)
        ema = loss_sum if ema is None else 0.98 * ema + 0.02 * loss_sum
        if step % log_every == 0 or step == steps - 1:
            print(f"step {step} loss {loss_sum:.4f} ema {ema:.4f} lr {lr_at(step, steps, lr):.2e} "
                  f"{time.time() - t0:.0f}s", file=sys.stderr, flush=True)
        if minutes and time.time() - t0 > minutes * 60:
            print(f"stopping at step {step}: --minutes {minutes} reached (run not reproducible)", file=sys.stderr)
            break
    train_s = time.time() - t0
    model.eval()
    ckpt = out / CHECKPOINT_DIR
    written = write_checkpoint(ckpt, cfg, model.numpy_weights(), merges=merges)
    meta = {"init": str(init) if init else None, "seed": seed, "steps": step + 1, "batch": batch, "lr": lr, "families": families, "extra_weight": extra_weight, "history_rate": history_rate, "weights": mix_weights, "train_seconds": round(train_s),
            "threads": torch.get_num_threads(), "params": n_params}
    (out / "train_meta.json").write_text(json.dumps(meta, indent=1))
    print(f"saved {ckpt} ({written['vocab_size']} vocab) in {train_s:.0f}s", file=sys.stderr)
    return model, bpe


def torch_logits_fn(model: LLaDA2):
    @torch.no_grad()
    def fn(ids: np.ndarray) -> np.ndarray:
        return model(torch.from_numpy(np.asarray(ids, dtype=np.int64))[None])[0].numpy()
    return fn


def check_parity(model: LLaDA2, ckpt: Path) -> float:
    """Max |logit difference| between this torch model and the numpy reference on the saved checkpoint."""
    from dllm_cli.reference import load_hf
    ref = load_hf(ckpt, np.float64)
    ids = np.random.default_rng(0).integers(0, model.cfg["vocab_size"], size=80)
    with torch.no_grad():
        mine = model(torch.from_numpy(ids)[None])[0].double().numpy()
    diff = float(np.abs(ref.forward(ids) - mine).max())
    print(f"torch vs numpy reference: max |dlogit| = {diff:.2e}", file=sys.stderr)
    return diff


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--minutes", type=float, default=0.0, help="wall-clock cap (0 = none); hitting it breaks reproducibility")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--init", type=Path, default=None,
                    help="continue from this checkpoint (a previous stage's directory, or an f32 demo GGUF)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--families", choices=sorted(tasks.FAMILIES), default="short",
                    help="task mixture: short (eight families), chat (short + phrasing), all (short + long answers), "
                         "demo (chat reworded + wide-operand arithmetic + the help answer: the shipped model, stage 4)")
    ap.add_argument("--extra-weight", type=float, default=1.0,
                    help="sampling weight of the families beyond the eight short ones (training only)")
    ap.add_argument("--history-rate", type=float, default=0.0,
                    help="share of training questions asked after one or two earlier turns (multi-turn chat)")
    ap.add_argument("--weights", default="",
                    help="sampling weights of some families, e.g. add=5,sub=3.5 (over the mixture's own: tasks.WEIGHTS)")
    ap.add_argument("--eval", type=int, default=100, help="held-out examples scored at the end (0 = skip)")
    ap.add_argument("--gguf", action="store_true", help="also convert to DIR/demo.gguf (f32)")
    a = ap.parse_args(argv)
    if a.init is not None and not (a.init / "config.json").is_file() and not (a.init.suffix == ".gguf" and a.init.is_file()):
        ap.error(f"--init {a.init} is not a checkpoint written by a previous stage (no config.json)")
    if not a.extra_weight > 0:
        ap.error(f"--extra-weight must be > 0, got {a.extra_weight}")
    if not 0 <= a.history_rate <= 1:
        ap.error(f"--history-rate must be in [0, 1], got {a.history_rate}")
    try:
        weights = {k: float(v) for k, v in (kv.split("=", 1) for kv in a.weights.split(",") if kv)}
    except ValueError:
        ap.error(f"--weights must look like add=5,sub=3.5, got {a.weights!r}")
    if any(k not in tasks.FAMILIES[a.families] or not v > 0 for k, v in weights.items()):
        ap.error(f"--weights names families of --families {a.families} with weights > 0, got {a.weights!r}")
    if a.steps < 1 or a.batch < 1 or a.threads < 1:
        ap.error("--steps, --batch and --threads must be at least 1")
    torch.set_num_threads(a.threads)
    a.out.mkdir(parents=True, exist_ok=True)
    model, bpe = train(a.out, steps=a.steps, minutes=a.minutes, seed=a.seed, batch=a.batch, lr=a.lr,
                       init=a.init, extra_weight=a.extra_weight, families=a.families, history_rate=a.history_rate,
                       weights=weights or None)
    check_parity(model, a.out / CHECKPOINT_DIR)
    if a.eval:
        chat = a.families in ("demo", "demo6")
        ex = tasks.eval_set(a.eval, families=tasks.CHAT_TASKS if chat else tasks.FAMILIES[a.families])
        for mode in ("quality", "speed"):
            print(format_score(evaluate(torch_logits_fn(model), bpe, ex, mode)), file=sys.stderr, flush=True)
    if a.gguf:
        from converters import convert
        convert(str(a.out / CHECKPOINT_DIR), str(a.out / "demo.gguf"), outtype="f32", model_version="2.1", force=True)
        print(f"wrote {a.out / 'demo.gguf'}", file=sys.stderr)


if __name__ == "__main__":
    main()
