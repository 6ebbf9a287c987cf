"""The timed runs: prefill, KV step vs window recompute, diffusion generation per mode, the AR baseline.

Every measurement is warm-up runs followed by ``reps`` timed repetitions; rows carry mean ± sd over the
repetitions. Generation runs through the same engine as ``dllm run`` (``decoding.engine.generate``) on a
``Timed`` proxy that clocks each ``step`` and ``commit`` of the session. Experts touched come from a
separate instrumented pass (``experts.ExpertProbe``) that replays the same greedy generation.
"""
from __future__ import annotations

import os
import resource
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from dllm_cli.bench.baselines import PAPER_TPF, ar_decode, recompute_step
from dllm_cli.bench.experts import ExpertProbe
from dllm_cli.bench.roofline import Shapes, forward_cost, moe_floor, roofline_pct
from dllm_cli.decoding import engine
from dllm_cli.decoding.events import BlockEvent, DoneEvent
from dllm_cli.decoding.stepper import WantLogits
from dllm_cli.generate import decode_config
from dllm_cli.runtime.model import Model
from dllm_cli.runtime.options import DEFAULT_KV_TYPE, from_flags
from dllm_cli.runtime.session import Session

Progress = Callable[[str], None]

LONG_TEXT = ("Block diffusion language models refine a block of masked positions in parallel, committing the "
             "finished block to a key-value cache before moving on. The cost of one refinement step is set by "
             "the weights it must read: attention, the shared expert, the output head, and every routed expert "
             "that any token of the block selects. ")
DEFAULT_PROMPTS = (
    ("short", "What is 12 plus 7? Answer with one number."),
    ("long", "Summarize the following text in one sentence.\n\n" + LONG_TEXT * 6),
)


@dataclass
class BenchConfig:
    modes: tuple[str, ...] = ("speed", "quality")
    threads: tuple[int | None, ...] = (None,)
    reps: int = 3
    warmup: int = 1
    max_tokens: int = 64
    prompts: tuple[tuple[str, str], ...] = DEFAULT_PROMPTS
    prefill: tuple[int, ...] = (256,)
    prefixes: tuple[int, ...] = (256, 1024)
    tests: tuple[str, ...] = ("pp", "step", "gen", "ar")
    ar_tokens: int = 32
    recompute_samples: int = 3
    kv_type: str = DEFAULT_KV_TYPE
    flash_attn: str = "auto"  # auto | on | off
    rpc: str | None = None    # ggml RPC workers (HOST:PORT,...)
    tensor_split: tuple[float, ...] = ()
    ctx_size: int = 2048
    experts: bool = True
    paper_tpf: str | None = None  # key of PAPER_TPF to report the AR ratio at (random-weight models)

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


def stats(xs: Sequence[float]) -> dict[str, float]:
    """mean, sd (sample), p50, p90 of ``xs``."""
    a = np.asarray(xs, dtype=np.float64)
    if a.size == 0:
        return {"mean": 0.0, "sd": 0.0, "p50": 0.0, "p90": 0.0, "n": 0}
    return {"mean": float(a.mean()), "sd": float(a.std(ddof=1)) if a.size > 1 else 0.0,
            "p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)), "n": int(a.size)}


def peak_rss_bytes() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r if os.uname().sysname == "Darwin" else r * 1024)


class Timed:
    """A ``StepModel`` proxy that clocks every ``step``/``commit`` and keeps the step inputs."""

    def __init__(self, inner: Session, probe: ExpertProbe | None = None) -> None:
        self.inner, self.probe = inner, probe
        self.n_vocab, self.mask_id, self.eos_id = inner.n_vocab, inner.mask_id, inner.eos_id
        self.edit_ids = getattr(inner, "edit_ids", None)
        self.block_length, self.n_ctx = inner.block_length, inner.n_ctx
        self.step_s: list[float] = []
        self.commit_s: list[float] = []
        self.steps: list[tuple[list[int], int, int]] = []  # (window tokens incl. cached prefix, start, rows)
        self.unions: list[dict[int, int]] = []

    @property
    def cached(self) -> list[int]:
        return self.inner.cached

    def step(self, tokens: Sequence[int], start: int, rows: Sequence[int], want_logits: WantLogits = False,
             attn_block: int | None = None) -> Any:
        if self.probe:
            self.probe.clear()
        t0 = time.perf_counter()
        out = self.inner.step(tokens, start, rows, want_logits, attn_block)
        self.step_s.append(time.perf_counter() - t0)
        self.steps.append((self.inner.cached[:start] + [int(t) for t in tokens], start, len(rows)))
        if self.probe:
            self.unions.append(self.probe.union_sizes())
        return out

    def commit(self, tokens: Sequence[int], start: int) -> None:
        t0 = time.perf_counter()
        self.inner.commit(tokens, start)
        self.commit_s.append(time.perf_counter() - t0)

    def rollback(self, pos: int) -> None:
        self.inner.rollback(pos)


@dataclass
class GenRun:
    tokens: int
    forwards: int
    blocks: int
    edits: int
    steps: int
    elapsed: float
    prefill: float
    first_block: float
    step_s: list[float] = field(default_factory=list)
    timed: Timed | None = None
    inserts: int = 0  # LLaDA2.2 INSERT / DELETE edits
    deletes: int = 0


def generate_once(session: Session, ids: list[int], config: Any, probe: ExpertProbe | None = None) -> GenRun:
    """One generation from an empty cache through the engine; returns its counters and clocks."""
    session.reset()
    timed = Timed(session, probe)
    t0 = time.perf_counter()
    first_block = None
    done = None
    for ev in engine.generate(timed, ids, config, rng=np.random.default_rng(config.seed)):
        if isinstance(ev, BlockEvent) and first_block is None:
            first_block = time.perf_counter() - t0
        if isinstance(ev, DoneEvent):
            done = ev
    elapsed = time.perf_counter() - t0
    assert done is not None
    prefill = timed.commit_s[0] if timed.commit_s and len(ids) >= session.block_length else 0.0
    return GenRun(len(done.ids), done.forwards, done.commits + 1, done.edits, done.steps, elapsed, prefill,
                  first_block or elapsed, timed.step_s, timed, done.inserts, done.deletes)


def prompt_token_ids(model: Model, text: str) -> list[int]:
    """A user turn in the model's chat template (as `dllm run` sends it), or the raw text if it has none."""
    if model.chat_template is not None:
        return model.chat_ids([{"role": "user", "content": text}])
    return model.tokenize(text, special=True)


def filler_ids(model: Model, n: int) -> list[int]:
    """``n`` ordinary token ids (the long text repeated), for fixed-length prefill and prefix tests."""
    base = model.tokenize(LONG_TEXT, special=False) or [0]
    return (base * (n // len(base) + 1))[:n]


def _gpu_free() -> int | None:
    """Free memory summed over the GPU devices (None on a CPU-only runtime): VRAM taken = before - after."""
    from dllm_cli.runtime import bindings
    from dllm_cli.runtime.library import load as load_runtime

    rt = load_runtime()
    gpus = [d for d in bindings.devices(rt) if d["type"] in ("gpu", "igpu")] if rt.backend != "cpu" else []
    return sum(int(d["memory_free"]) for d in gpus) if gpus else None


class Bench:
    """All measurements for one model file at one thread count."""

    def __init__(self, path: Path, cfg: BenchConfig, threads: int | None, progress: Progress) -> None:
        self.cfg, self.progress = cfg, progress
        need = max([cfg.ctx_size, *(p + 64 for p in cfg.prefixes), *(p + 32 for p in cfg.prefill)])
        self.opts = from_flags(kv_type=cfg.kv_type, flash_attn=cfg.flash_attn, threads=threads, ctx_size=need,
                               ubatch=need, rpc=cfg.rpc, tensor_split=cfg.tensor_split)
        free0 = _gpu_free()
        self.model = Model(path, self.opts)
        self.session = Session(self.model, self.opts)
        free1 = _gpu_free()
        self.B = self.session.block_length
        self.shapes = Shapes.from_gguf(path)
        self.base = {"model": self.model.description, "path": str(path), "size_bytes": self.model.size_bytes,
                     "params": self.model.n_params, "backend": self.model.rt.backend, "threads": self.opts.n_threads,
                     "kv_type": cfg.kv_type, "flash_attn": cfg.flash_attn, "rpc": cfg.rpc, "n_layers": self.shapes.layers,
                     "vram_bytes": free0 - free1 if free0 is not None and free1 is not None else None}

    def close(self) -> None:
        self.session.close()
        self.model.close()

    def row(self, test: str, samples_s: Sequence[float], n_tok: float, **extra: Any) -> dict[str, Any]:
        """A result row: t/s = tokens / time per repetition, mean ± sd over repetitions."""
        tps = [n_tok / s for s in samples_s if s > 0]
        st = stats(tps)
        return {**self.base, "test": test, "reps": len(samples_s), "tps": round(st["mean"], 3),
                "tps_sd": round(st["sd"], 3), **extra}

    def _repeat(self, fn: Callable[[], float]) -> list[float]:
        for _ in range(self.cfg.warmup):
            fn()
        return [fn() for _ in range(self.cfg.reps)]

    # --- prefill: one batch (block-causal mask) vs one decode per block ------------------------------
    def prefill(self, n: int) -> list[dict[str, Any]]:
        ids = filler_ids(self.model, n)
        s = self.session

        def one_batch() -> float:
            s.reset()
            t0 = time.perf_counter()
            s.commit(ids, 0)
            return time.perf_counter() - t0

        def blockwise() -> float:
            s.reset()
            t0 = time.perf_counter()
            for i in range(0, n, self.B):
                s.commit(ids[i:i + self.B], i)
            return time.perf_counter() - t0

        a, b = self._repeat(one_batch), self._repeat(blockwise)
        ratio = statistics.mean(b) / statistics.mean(a)
        return [self.row(f"pp{n}", a, n, latency_s=stats(a), one_batch_speedup=round(ratio, 3)),
                self.row(f"pp{n}/blockwise", b, n, latency_s=stats(b))]

    # --- one 32-token step with the KV prefix vs recomputing the window [0, P+B) -------------------
    def step_vs_recompute(self, prefix: int) -> list[dict[str, Any]]:
        s, B = self.session, self.B
        ids = filler_ids(self.model, prefix)
        # half filler, half masks; the same ids as ids[:B // 2] when the prefix is that long, and still a
        # whole block when it is shorter (--prefix 0 measures a step with no KV prefix at all)
        block = filler_ids(self.model, B // 2) + [s.mask_id] * (B - B // 2)
        s.reset()
        s.commit(ids, 0)

        def kv() -> float:
            t0 = time.perf_counter()
            s.step(block, prefix, range(B))
            return time.perf_counter() - t0

        kv_s = self._repeat(kv)
        window = ids + block
        rc_s = self._repeat(lambda: recompute_step(s, window, B))
        ratio = statistics.mean(rc_s) / statistics.mean(kv_s)
        union = self._step_union(ids, block) if self.cfg.experts else float(self.shapes.experts)
        cost = forward_cost(self.shapes, B, prefix, B, union)
        return [self.row(f"step@{prefix}", kv_s, B, step_s=stats(kv_s), recompute_ratio=round(ratio, 2),
                         flops_per_step=cost.flops, moe_layer=moe_floor(self.shapes, union, self.machine),
                         roofline=roofline_pct(cost, statistics.mean(kv_s), self.machine, self.shapes.layers)),
                self.row(f"recompute@{prefix}", rc_s, B, step_s=stats(rc_s))]

    def _step_union(self, prefix_ids: list[int], block: list[int]) -> float:
        """Distinct routed experts per MoE layer (mean over layers) of the timed step, read from llama.cpp on a
        separate instrumented context (the timed one carries no callback)."""
        probe = ExpertProbe(self.model.rt)
        sess = Session(self.model, self.opts, eval_callback=probe.callback)
        try:
            if prefix_ids:
                sess.commit(prefix_ids, 0)
            probe.clear()
            sess.step(block, len(prefix_ids), range(self.B))
            sizes = probe.union_sizes()
        finally:
            sess.close()
        return float(np.mean(list(sizes.values()))) if sizes else 0.0

    # --- autoregressive decoding of the same weights -------------------------------------------------
    def ar(self, n_prompt: int) -> dict[str, Any]:
        ids = filler_ids(self.model, n_prompt)
        n = self.cfg.ar_tokens
        s = self.session
        s.set_causal(True)
        try:
            times = self._repeat(lambda: ar_decode(s, ids, n))
        finally:
            s.reset()
            s.set_causal(False)
        lat = [t / n for t in times]
        cost = forward_cost(self.shapes, 1, n_prompt + n / 2, 1, self.shapes.experts_used)
        return self.row("ar", times, n, step_s=stats(lat), tpf=1.0, n_prompt=n_prompt,
                        moe_layer=moe_floor(self.shapes, self.shapes.experts_used, self.machine),
                        roofline=roofline_pct(cost, statistics.mean(lat), self.machine, self.shapes.layers))

    # --- diffusion generation ---------------------------------------------------------------------------
    def generation(self, mode: str, prompts: list[tuple[str, list[int]]]) -> dict[str, Any]:
        config = decode_config(self.model, mode, max_tokens=self.cfg.max_tokens)
        runs: list[list[GenRun]] = []
        for r in range(self.cfg.warmup + self.cfg.reps):
            rep = []
            for name, ids in (prompts[:1] if r < self.cfg.warmup else prompts):  # warm-up: builds the graphs
                self.progress(f"gen {mode} rep {r + 1}/{self.cfg.warmup + self.cfg.reps} prompt {name}")
                rep.append(generate_once(self.session, ids, config))
            if r >= self.cfg.warmup:
                runs.append(rep)
        last = runs[-1]
        flat = [g for rep in runs for g in rep]
        tokens = sum(g.tokens for g in last)
        decode_s = [sum(g.elapsed - g.prefill for g in rep) for rep in runs]
        steps = [x for g in flat for x in g.step_s]
        out_rows = [n for g in flat if g.timed for (_, _, n) in g.timed.steps]
        forwards = sum(g.forwards for g in last)
        row = self.row(f"gen/{mode}", decode_s, tokens, mode=mode, tokens=tokens, forwards=forwards,
                       tpf=round(tokens / forwards, 4) if forwards else 0.0,
                       forwards_per_block=round(forwards / max(sum(g.blocks for g in last), 1), 3),
                       blocks=sum(g.blocks for g in last), edits=sum(g.edits for g in last),
                       edits_per_token=round(sum(g.edits for g in last) / max(tokens, 1), 4),
                       **self._indel(config, last, tokens),
                       prompt_tokens=[len(ids) for _, ids in prompts],
                       prefill_tps=round(sum(len(ids) for _, ids in prompts) / max(sum(g.prefill for g in last), 1e-9), 2),
                       first_block_s=stats([g.first_block for g in flat]), step_s=stats(steps),
                       rows_per_step=round(float(np.mean(out_rows)), 2) if out_rows else 0.0)
        row["experts"] = self._experts(config, prompts) if self.cfg.experts else None
        row["recompute"] = self._recompute(last)
        return row

    @staticmethod
    def _indel(config: Any, runs: list[GenRun], tokens: int) -> dict[str, Any]:
        """LLaDA2.2 rows: inserts and deletes per generated token, next to the substitutions (``edits``)."""
        if config.version != "2.2":
            return {}
        ins, dels = sum(g.inserts for g in runs), sum(g.deletes for g in runs)
        return {"inserts": ins, "deletes": dels, "inserts_per_token": round(ins / max(tokens, 1), 4),
                "deletes_per_token": round(dels / max(tokens, 1), 4)}

    def _experts(self, config: Any, prompts: list[tuple[str, list[int]]]) -> dict[str, Any]:
        """Instrumented replay: per step, per MoE layer, distinct routed experts over the active block."""
        from dllm_cli.decoding.config import with_overrides

        config = with_overrides(config, max_tokens=min(config.max_tokens, self.B))  # one block per prompt
        probe = ExpertProbe(self.model.rt)
        sess = Session(self.model, self.opts, eval_callback=probe.callback)
        try:
            unions: list[float] = []
            per_layer: dict[int, list[int]] = {}
            for name, ids in prompts:
                self.progress(f"experts probe ({name})")
                run = generate_once(sess, ids, config, probe)
                assert run.timed is not None
                for u in run.timed.unions:
                    if u:
                        unions.append(float(np.mean(list(u.values()))))
                        for il, v in u.items():
                            per_layer.setdefault(il, []).append(v)
        finally:
            sess.close()
        st = stats(unions)
        return {"source": "llama.cpp cb_eval ffn_moe_topk", "of": self.shapes.experts,
                "per_token": self.shapes.experts_used, "mean": round(st["mean"], 2), "p90": round(st["p90"], 2),
                "max": max((max(v) for v in per_layer.values()), default=0),
                "per_layer_mean": {str(k): round(float(np.mean(v)), 2) for k, v in sorted(per_layer.items())}}

    def _recompute(self, gens: list[GenRun]) -> dict[str, Any]:
        """Full-window recompute of sampled steps of the last repetition against their KV-step times."""
        pairs = [(w, rows, t) for g in gens if g.timed for (w, _, rows), t in zip(g.timed.steps, g.step_s)]
        if not pairs:
            return {}
        idx = np.unique(np.linspace(0, len(pairs) - 1, min(self.cfg.recompute_samples, len(pairs))).astype(int))
        rc, kv = [], []
        for i in idx:
            window, rows, t_kv = pairs[i]
            self.progress(f"recompute window of {len(window)} tokens")
            self.session.reset()
            rc.append(recompute_step(self.session, window, self.B, rows))
            kv.append(t_kv)
        return {"samples": len(idx), "window_tokens": [len(pairs[i][0]) for i in idx],
                "recompute_step_s": round(statistics.mean(rc), 5), "kv_step_s": round(statistics.mean(kv), 5),
                "ratio": round(statistics.mean(rc) / statistics.mean(kv), 2)}

    def run(self, machine: dict[str, Any]) -> list[dict[str, Any]]:
        self.machine = machine
        cfg, rows = self.cfg, []
        if "pp" in cfg.tests:
            for n in cfg.prefill:
                self.progress(f"prefill {n}")
                rows += self.prefill(n)
        if "step" in cfg.tests:
            for p in cfg.prefixes:
                self.progress(f"step with prefix {p}")
                rows += self.step_vs_recompute(p)
        ar_row = None
        if "ar" in cfg.tests:
            self.progress("autoregressive baseline")
            ar_row = self.ar(max(32, min(256, cfg.ctx_size // 4)))
            rows.append(ar_row)
        if "gen" in cfg.tests:
            prompts = [(name, prompt_token_ids(self.model, text)) for name, text in cfg.prompts]
            for mode in cfg.modes:
                row = self.generation(mode, prompts)
                self._baselines(row, ar_row, mode)
                rows.append(row)
        for r in rows:
            r["peak_rss_bytes"] = peak_rss_bytes()
        return rows

    def _baselines(self, row: dict[str, Any], ar_row: dict[str, Any] | None, mode: str) -> None:
        step = row["step_s"]["mean"]
        union = (row.get("experts") or {}).get("mean", self.shapes.experts)
        prefix = statistics.mean(row["prompt_tokens"]) + self.cfg.max_tokens / 2
        cost = forward_cost(self.shapes, self.B, prefix, row.get("rows_per_step") or self.B, union)
        row["roofline"] = roofline_pct(cost, step, self.machine, self.shapes.layers)
        if ar_row is None:
            return
        ar_tps = ar_row["tps"]
        row["vs_ar"] = round(row["tps"] / ar_tps, 3) if ar_tps else None
        key = self.cfg.paper_tpf or ""
        tpf = PAPER_TPF.get(f"{key}/{mode}") if key else None
        if tpf:
            at = tpf / step
            row["paper_tpf"] = {"tpf": tpf, "source": f"{key} {mode} (spec §6)", "tps": round(at, 3),
                                "vs_ar": round(at / ar_tps, 3) if ar_tps else None}


def machine_info() -> dict[str, Any]:
    import platform

    cpu = platform.processor() or platform.machine()
    mem = 0
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = int(line.split()[1]) * 1024
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "ram_bytes": mem, "os": platform.platform(),
            "load_avg": [round(x, 2) for x in os.getloadavg()]}


def quiet_llama_log() -> None:
    """Drop llama.cpp's load/graph log lines (stderr carries the progress display); DLLM_DEBUG=1 keeps them."""
    from dllm_cli.runtime.library import set_log_echo

    set_log_echo(os.environ.get("DLLM_DEBUG") == "1")


def _prefixed(say: Progress, prefix: str) -> Progress:
    """``say`` with every message prefixed by ``prefix`` (bound now, not when the loop moves on)."""
    return lambda msg: say(f"{prefix}: {msg}")


def run_benchmark(models: Sequence[str | Path], config: BenchConfig | None = None, *,
                  progress: Progress | None = None, machine: dict[str, Any] | None = None,
                  estimate_to: int | None = None) -> dict[str, Any]:
    """Benchmark every model at every thread count; returns the JSON document (schema ``dllm-bench/1``)."""
    from dllm_cli.bench.report import SCHEMA, estimate_layers
    from dllm_cli.bench.roofline import probe_machine

    cfg = config or BenchConfig()
    say = progress or (lambda _msg: None)
    info = machine_info()
    quiet_llama_log()
    from dllm_cli.runtime import threads as T
    from dllm_cli.runtime.library import load

    info["threads"] = T.describe(load().wait)  # the default thread count and the barrier wait of this runtime
    if machine is None:
        say("probing matmul throughput and memory bandwidth")
        machine = probe_machine()
    info.update(machine)
    results: list[dict[str, Any]] = []
    for path in models:
        for threads in cfg.threads:
            say(f"loading {Path(path).name} ({threads or T.default_threads()} threads)")
            b = Bench(Path(path), cfg, threads, _prefixed(say, Path(path).name))
            try:
                results += b.run(machine)
            finally:
                b.close()
    info["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    doc: dict[str, Any] = {"schema": SCHEMA, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": info,
                           "config": cfg.to_dict(), "results": results}
    if estimate_to:
        doc["estimates"] = estimate_layers(results, estimate_to)
    return doc
