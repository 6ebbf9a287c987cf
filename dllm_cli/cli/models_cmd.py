"""``dllm models``: the registry of known checkpoints."""
from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from dllm_cli import registry
from dllm_cli.cli import output
from dllm_cli.cli.app import app

models_app = typer.Typer(help="List known LLaDA2.x checkpoints (models.toml).", invoke_without_command=True,
                         no_args_is_help=False)
app.add_typer(models_app, name="models")


def _local(alias: str) -> str:
    p = registry.models_dir()
    found = sorted(p.glob(f"{alias}*.gguf")) if p.is_dir() else []
    return ", ".join(f.name for f in found) or "-"


@models_app.callback()
def models_list(ctx: typer.Context,
                as_json: Annotated[bool, typer.Option("--json", help="Print one JSON document.")] = False) -> None:
    """List every known model with its repo, version and recommended quantization.

    Example: dllm models
    """
    if ctx.invoked_subcommand is not None:
        return
    specs = registry.load_registry()
    if as_json:
        output.document([_spec_dict(s) for s in specs.values()])
        return
    table = Table(title="known models (models.toml)")
    for col in ("alias", "repo", "version", "params", "quant", "size GB", "local"):
        table.add_column(col)
    for s in specs.values():
        size = s.sizes_gb.get(s.recommended_quant, "")
        table.add_row(s.alias, s.repo or "(embedded)", s.version, f"{s.params_total}/{s.params_active}",
                      s.recommended_quant, str(size), "embedded" if s.embedded else _local(s.alias))
    output.rendered(table)


def _spec_dict(s: registry.ModelSpec) -> dict:
    return {"alias": s.alias, "repo": s.repo, "version": s.version, "params_total": s.params_total,
            "params_active": s.params_active, "description": s.description,
            "recommended_quant": s.recommended_quant, "sizes_gb": s.sizes_gb,
            "presets": {m: vars(p) for m, p in s.presets.items()}}


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
