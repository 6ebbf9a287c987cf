"""``dllm models``: the registry of known checkpoints."""
from __future__ import annotations

from typing import Annotated

import typer
from rich.cells import cell_len
from rich.table import Table

from dllm_cli import registry
from dllm_cli.cli import output
from dllm_cli.cli.app import app

models_app = typer.Typer(help="List known LLaDA2.x checkpoints (models.toml).", invoke_without_command=True,
                         no_args_is_help=False)
app.add_typer(models_app, name="models")


COLUMNS = ("alias", "repo", "version", "params", "quant", "size GB", "local")
DROP_ORDER = ("repo", "quant", "size GB", "local", "params", "version")  # left out first to last; alias never
WRAPS = ("local",)  # the one column whose cells (lists) may wrap; every other cell is shown whole


def _local_quants(aliases: list[str]) -> dict[str, list[str]]:
    """alias -> what is converted in the local store (``llada2.1-mini-q4_k_m.gguf`` -> ``q4_k_m``). A file
    belongs to the longest alias it is named after: ``llada2.0-mini-cap-bf16.gguf`` is llada2.0-mini-cap's."""
    return {alias: [f.name[len(alias) + 1:-len(".gguf")] or f.name for f in files]
            for alias, files in registry.local_files(aliases).items()}


def _rows(specs: dict[str, registry.ModelSpec]) -> list[dict[str, str]]:
    local = _local_quants(list(specs))
    rows = []
    for s in specs.values():
        params = s.params_total if s.params_total == s.params_active else f"{s.params_total}/{s.params_active}"
        rows.append({"alias": s.alias, "repo": s.repo or "(embedded)", "version": s.version, "params": params,
                     "quant": s.recommended_quant, "size GB": str(s.sizes_gb.get(s.recommended_quant, "")),
                     "local": "embedded" if s.embedded else ", ".join(local[s.alias]) or "-"})
    return rows


def _min_width(rows: list[dict[str, str]], col: str) -> int:
    """Terminal cells ``col`` needs: its whole text, or for a list column its longest item (the list wraps)."""
    texts = [col] + [r[col] for r in rows]
    if col in WRAPS:
        texts = [item for t in texts for item in t.split(" ")]
    return max(cell_len(t) for t in texts)


def fit_columns(rows: list[dict[str, str]], width: int) -> list[str]:
    """The columns that fit ``width`` terminal cells with no cell cut, leaving out ``DROP_ORDER`` in turn; empty
    when even the aliases alone do not fit in a box. A rich table of n columns takes 3n + 1 cells for its
    borders and padding."""
    kept = list(COLUMNS)
    for drop in (None, *DROP_ORDER):
        if drop is not None:
            kept.remove(drop)
        if sum(_min_width(rows, c) for c in kept) + 3 * len(kept) + 1 <= width:
            return kept
    return []


@models_app.callback()
def models_list(ctx: typer.Context,
                as_json: Annotated[bool, typer.Option("--json", help="Print one JSON document.")] = False) -> None:
    """List every known model with its repo, version, parameters (total/active), recommended quantization and
    what is converted locally. Aliases are never cut: in a narrow terminal less important columns are left out
    (the caption says which; `dllm models show ALIAS` and --json have everything).

    Example: dllm models
    """
    if ctx.invoked_subcommand is not None:
        return
    specs = registry.load_registry()
    if as_json:
        output.document([_spec_dict(s) for s in specs.values()])
        return
    rows = _rows(specs)
    kept = fit_columns(rows, output.out.width)
    if not kept:  # narrower than the longest alias in a box: the aliases alone, one per line
        for r in rows:
            output.answer(r["alias"])
        return
    left_out = [c for c in COLUMNS if c not in kept]
    caption = f"not shown at this width: {', '.join(left_out)} (see dllm models show ALIAS)" if left_out else None
    table = Table(title="known models (models.toml)", caption=caption)
    for col in kept:
        table.add_column(col, no_wrap=col not in WRAPS, overflow="fold")
    for r in rows:
        table.add_row(*(r[c] for c in kept))
    output.rendered(table)


def _spec_dict(s: registry.ModelSpec) -> dict:
    d = {"alias": s.alias, "repo": s.repo, "version": s.version, "params_total": s.params_total,
         "params_active": s.params_active, "description": s.description,
         "recommended_quant": s.recommended_quant, "sizes_gb": s.sizes_gb,
         "presets": {m: vars(p) for m, p in s.presets.items()}}
    if s.notes:
        d["notes"] = s.notes
    return d


@models_app.command("show")
def models_show(alias: Annotated[str, typer.Argument(help="Registry alias, e.g. llada2.1-mini.")],
                as_json: Annotated[bool, typer.Option("--json", help="Print one JSON document.")] = False) -> None:
    """Show one registry entry with its decode presets.

    Example: dllm models show llada2.1-mini
    """
    d = _spec_dict(registry.get_spec(alias))
    if as_json:
        output.document(d)
        return
    for k, v in d.items():
        output.answer(f"{k:18} {v}")
