"""``dllm bench``: diffusion-aware benchmark (table on stdout, progress on stderr)."""
from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.markup import escape

from dllm_cli import domains, outfiles
from dllm_cli.cli import options as O
from dllm_cli.cli import output
from dllm_cli.cli.app import app
from dllm_cli.bench.report import check_doc
from dllm_cli.errors import OutputError, UsageError, clip
from dllm_cli.outfiles import read_reason
from dllm_cli.registry import MODES

BENCH = "Benchmark"
MAX_INPUT_BYTES = 64 * 2**20  # a prompts file or a saved run; anything bigger is not one


class Shape(str, Enum):
    mini = "llada2-mini"
    flash = "llada2-flash"
    mini22 = "llada2.2-mini"


def _list(text: str | None) -> tuple[str, ...]:
    """Comma-separated names (``--modes``, ``--tests``); numbers go through ``domains.parse_list``."""
    return tuple(x.strip() for x in (text or "").split(",") if x.strip())


def _read_text(path: Path, what: str) -> str:
    """A user's text file, whole; unreadable, too large or not UTF-8 is a one-line UsageError naming it."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_INPUT_BYTES + 1)
    except OSError as e:
        raise UsageError(f"cannot read {what} {clip(str(path), 200, quote=False)}: {read_reason(e)}") from None
    if len(data) > MAX_INPUT_BYTES:
        raise UsageError(f"{what} {path} is larger than {MAX_INPUT_BYTES // 2**20} MB")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise UsageError(f"{what} {path}:{line} is not UTF-8 text") from None


def _read_prompts(path: Path) -> tuple[tuple[str, str], ...]:
    """One prompt per non-empty line; a ``.jsonl`` file holds {"name": ..., "prompt": ...} objects."""
    numbered = [(n, ln) for n, ln in enumerate(_read_text(path, "--prompts").splitlines(), 1) if ln.strip()]
    if not numbered:
        raise UsageError(f"--prompts {path} has no prompts")
    if path.suffix != ".jsonl":
        return tuple((f"p{i}", ln.replace("\\n", "\n")) for i, (_, ln) in enumerate(numbered))
    out = []
    for i, (n, ln) in enumerate(numbered):
        try:
            o = json.loads(ln)
        except ValueError as e:
            raise UsageError(f"--prompts {path}:{n} is not JSON ({getattr(e, 'msg', e)})") from None
        if not isinstance(o, dict) or not isinstance(o.get("prompt"), str) or not o["prompt"].strip():
            raise UsageError(f"--prompts {path}:{n} needs a non-empty \"prompt\" string",
                             'one {"name": ..., "prompt": ...} object per line')
        out.append((str(o.get("name", f"p{i}")), o["prompt"]))
    return tuple(out)


class _Status:
    """The current step on stderr: a spinner on a terminal, plain lines otherwise."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.status = output.err.status("starting") if output.err.is_terminal and not quiet else None
        if self.status:
            self.status.start()

    def __call__(self, msg: str) -> None:
        if self.status:
            self.status.update(escape(msg))
        elif not self.quiet:
            output.info(escape(msg))

    def close(self) -> None:
        if self.status:
            self.status.stop()


def _runtime_path(kv_type: O.KVType | None, flash_attn: O.FlashAttn, exact: bool, rpc: str | None,
                  tensor_split: str | None) -> dict[str, Any]:
    """BenchConfig's runtime fields from the shared runtime flags (validated like run and chat)."""
    from dllm_cli.runtime.options import from_flags, parse_split

    opts = from_flags(kv_type=kv_type.value if kv_type else None, flash_attn=flash_attn.value, exact=exact,
                      rpc=rpc, tensor_split=parse_split(tensor_split))
    return {"kv_type": opts.kv_type, "flash_attn": {None: "auto", True: "on", False: "off"}[opts.flash_attn],
            "rpc": opts.rpc, "tensor_split": opts.tensor_split}


def _load_doc(path: Path) -> dict:
    """A saved ``dllm bench --json`` document, checked field by field (errors name the file and the field)."""
    text = _read_text(path, "--compare")
    try:
        doc = json.loads(text)
    except ValueError as e:
        where = f"{path}:{e.lineno}" if isinstance(e, json.JSONDecodeError) else str(path)
        raise UsageError(f"--compare {where} is not JSON ({getattr(e, 'msg', e)})",
                         "give a file written by `dllm bench --json` or --save") from None
    problem = check_doc(doc)
    if problem:
        raise UsageError(f"--compare {path} is not a `dllm bench --json` document: {problem}",
                         "give a file written by `dllm bench --json` or --save")
    return doc


@app.command("bench")
def bench_cmd(
    models: Annotated[Optional[list[str]], typer.Argument(
        help="GGUF paths or registry aliases (default: --synthetic, else the demo model).", show_default=False)] = None,
    synthetic: Annotated[Optional[Shape], typer.Option("--synthetic", help="Build (and cache under "
                         "$DLLM_HOME/synthetic/) a random-weight GGUF with the real shapes.", rich_help_panel=BENCH)] = None,
    layers: Annotated[Optional[str], typer.Option("--layers", help="Truncate the synthetic model to N layers; "
                      "several (2,4) add an estimate for --estimate-layers.", rich_help_panel=BENCH)] = None,
    quant: Annotated[str, typer.Option("--quant", help="Quantization of the synthetic model (f16, q4_k_m, q4_k_moe, ...).",
                                       rich_help_panel=BENCH)] = "q4_k_m",
    modes: Annotated[str, typer.Option("--modes", help="Decode modes to generate with.", rich_help_panel=BENCH)] = "speed,quality",
    tests: Annotated[str, typer.Option("--tests", help="pp (prefill), step (KV step vs recompute), gen, ar.",
                                       rich_help_panel=BENCH)] = "pp,step,gen,ar",
    threads: Annotated[Optional[str], typer.Option("--threads", "-t", help="Thread counts, e.g. 1,2 (default: one per physical core).",
                                                   rich_help_panel=O.RUNTIME)] = None,
    reps: Annotated[int, typer.Option("--reps", "-r", callback=O.domain("reps"), help="Timed repetitions.", rich_help_panel=BENCH)] = 3,
    warmup: Annotated[int, typer.Option("--warmup", callback=O.domain("warmup"), help="Untimed warm-up runs.", rich_help_panel=BENCH)] = 1,
    max_tokens: O.MaxTokens = 64,
    prompts: Annotated[Optional[Path], typer.Option("--prompts", help="Prompt file: one per line, or JSONL "
                       "with a \"prompt\" field (default: a short and a long prompt).", rich_help_panel=BENCH)] = None,
    prefill: Annotated[str, typer.Option("--prefill", help="Prompt lengths for the prefill test.", rich_help_panel=BENCH)] = "256",
    prefix: Annotated[str, typer.Option("--prefix", help="KV prefix lengths for the step test.", rich_help_panel=BENCH)] = "256,1024",
    ar_tokens: Annotated[int, typer.Option("--ar-tokens", callback=O.domain("ar_tokens"), help="Tokens per AR baseline run.", rich_help_panel=BENCH)] = 32,
    recompute_samples: Annotated[int, typer.Option("--recompute-samples", callback=O.domain("recompute_samples"), help="Generation steps re-timed "
                                                   "as full-window recomputes.", rich_help_panel=BENCH)] = 3,
    paper_tpf: Annotated[Optional[str], typer.Option("--paper-tpf", help="Also report the AR ratio at the paper's "
                         "tokens per forward of this model (llada2.1-mini, llada2.0-mini, ...; default for --synthetic).",
                         rich_help_panel=BENCH)] = None,
    no_experts: Annotated[bool, typer.Option("--no-experts", help="Skip the instrumented experts-touched pass.",
                                             rich_help_panel=BENCH)] = False,
    estimate_layers: Annotated[Optional[int], typer.Option("--estimate-layers", callback=O.domain("estimate_layers"), help="Extrapolate runs "
                               "at several --layers to this depth (default: the shape's full depth).",
                               rich_help_panel=BENCH)] = None,
    quality_vs: Annotated[Optional[str], typer.Option("--quality-vs", help="Also compare each model's logits "
                          "with this reference GGUF (f16/f32 of the same weights): error and argmax agreement.",
                          rich_help_panel=BENCH)] = None,
    kv_type: O.KvType = None,
    flash_attn: O.FlashAttnOpt = O.FlashAttn.auto,
    exact: O.Exact = False,
    rpc: O.Rpc = None,
    tensor_split: O.TensorSplit = None,
    ctx_size: O.CtxSize = 2048,
    as_json: Annotated[bool, typer.Option("--json", help="Print the JSON document.")] = False,
    as_csv: Annotated[bool, typer.Option("--csv", help="Print CSV rows.")] = False,
    as_md: Annotated[bool, typer.Option("--md", help="Print a Markdown table.")] = False,
    save: Annotated[Optional[Path], typer.Option("--save", "-o", help="Also write the JSON document here.")] = None,
    compare: Annotated[Optional[list[Path]], typer.Option("--compare", help="Compare two saved --json runs "
                       "(give it twice: --compare A.json --compare B.json) instead of measuring.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress on stderr.")] = False,
) -> None:
    """Benchmark diffusion decoding with side-by-side baselines (recompute, autoregressive, roofline).

    Examples:
      dllm bench --synthetic llada2-mini --layers 4 --quant q4_k_m
      dllm bench model.gguf --modes speed --threads 1,2 --json > run.json
      dllm bench --compare before.json --compare after.json
    """
    from dllm_cli.bench import report

    if sum((as_json, as_csv, as_md)) > 1:
        raise UsageError("choose one of --json, --csv, --md")
    if compare:
        if len(compare) != 2:
            raise UsageError("--compare needs exactly two files", "dllm bench --compare A.json --compare B.json")
        rows = report.compare(_load_doc(compare[0]), _load_doc(compare[1]))
        if as_json:
            output.document({"a": str(compare[0]), "b": str(compare[1]), "rows": rows})
        else:
            output.answer(report.compare_table(rows))
        return
    from dllm_cli.bench.baselines import PAPER_TPF, PAPER_TPF_DEFAULT
    from dllm_cli.bench.measure import BenchConfig, run_benchmark
    from dllm_cli.registry import resolve_model

    if paper_tpf and not any(k.startswith(paper_tpf + "/") for k in PAPER_TPF):
        raise UsageError(f"no paper TPF for {clip(paper_tpf)}",
                         f"use one of {', '.join(sorted({k.split('/')[0] for k in PAPER_TPF}))}")
    # every option is checked before the first measurement: a bad value must not cost a long run
    thread_counts = domains.parse_list("threads", threads)
    layer_counts = domains.parse_list("layers", layers)
    prefills, prefixes = domains.parse_list("prefill", prefill), domains.parse_list("prefix", prefix)
    bad = set(_list(tests)) - {"pp", "step", "gen", "ar"}
    if bad or not _list(tests):
        raise UsageError(f"unknown --tests {clip(', '.join(sorted(bad)) or tests)}", "use pp, step, gen, ar")
    bad = set(_list(modes)) - set(MODES)
    if bad or not _list(modes):
        raise UsageError(f"unknown --modes {clip(', '.join(sorted(bad)) or modes)}", f"use {', '.join(MODES)}")
    if synthetic is not None:
        from dllm_cli.runtime.quantize import PRESETS

        if quant != "f16" and quant not in PRESETS:
            raise UsageError(f"unknown --quant {clip(quant)}", f"use f16 or one of {', '.join(PRESETS)}")
    if save is not None:
        save = outfiles.check(save, what="the bench document", special=True)
    quality_ref = resolve_model(quality_vs) if quality_vs else None  # a typo must not cost a whole run
    bench_prompts = _read_prompts(prompts) if prompts else None
    runtime_fields = _runtime_path(kv_type, flash_attn, exact, rpc, tensor_split)
    failed_save: OutputError | None = None
    status = _Status(quiet)
    try:
        paths = [str(resolve_model(m)) for m in models or []]
        if synthetic is not None:
            from dllm_cli.bench.synthetic import SHAPES, build_synthetic

            for n in layer_counts or (None,):
                built = build_synthetic(synthetic.value, layers=n, quant=quant,
                                        progress=lambda what, i, total: status(f"synthetic: {what} ({i}/{total})"))
                paths.append(str(built.path))
            paper_tpf = paper_tpf or PAPER_TPF_DEFAULT[synthetic.value]
            estimate_layers = estimate_layers or int(SHAPES[synthetic.value]["num_hidden_layers"])
        if not paths:
            paths = [str(resolve_model(None))]
        if quality_ref is not None:  # before the bench: a mismatch must not cost a whole run
            from dllm_cli.bench.quality import check_comparable

            check_comparable(quality_ref, paths)
        cfg = BenchConfig(modes=_list(modes), threads=thread_counts or (None,), reps=reps, warmup=warmup,
                          max_tokens=max_tokens, prefill=prefills, prefixes=prefixes,
                          tests=_list(tests), ar_tokens=ar_tokens, recompute_samples=recompute_samples,
                          ctx_size=ctx_size, experts=not no_experts, paper_tpf=paper_tpf,
                          kv_type=runtime_fields["kv_type"], flash_attn=runtime_fields["flash_attn"],
                          rpc=runtime_fields["rpc"], tensor_split=runtime_fields["tensor_split"],
                          **({"prompts": bench_prompts} if bench_prompts else {}))
        doc = run_benchmark(paths, cfg, progress=status, estimate_to=estimate_layers)
        if quality_ref is not None:
            from dllm_cli.bench.quality import compare_quality

            doc["quality"] = compare_quality(quality_ref, paths, [t for _, t in cfg.prompts],
                                             threads=cfg.threads[0], progress=status)
    finally:
        status.close()
    if save:
        try:
            outfiles.write_text(save, json.dumps(doc, indent=1) + "\n", what="the bench document")
        except OutputError as e:  # the measurement is not lost: it still goes to stdout below
            output.error(escape(output.one_line(str(e))))
            failed_save = e
    if as_json:
        output.document(doc)
    elif as_csv:
        output.answer(report.to_csv(doc), end="")
    else:
        output.answer(report.table(doc, markdown=as_md))
    if failed_save is not None:
        raise typer.Exit(failed_save.exit_code)
