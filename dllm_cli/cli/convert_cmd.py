"""``dllm convert``: a Hugging Face LLaDA2.x checkpoint -> GGUF (stdout: the written path)."""
from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.progress import (BarColumn, DownloadColumn, Progress, TaskID, TextColumn,
                           TimeRemainingColumn, TransferSpeedColumn)

from dllm_cli import outfiles
from dllm_cli.cli import output
from dllm_cli.cli.app import app
from dllm_cli.errors import ConvertError
from dllm_cli.registry import is_file


class OutTypeChoice(str, Enum):
    f32 = "f32"
    f16 = "f16"
    bf16 = "bf16"
    q8_0 = "q8_0"


class QuantChoice(str, Enum):
    q8_0 = "q8_0"
    q6_k = "q6_k"
    q5_k_m = "q5_k_m"
    q4_k_m = "q4_k_m"
    q4_0 = "q4_0"
    q4_k_moe = "q4_k_moe"


class VersionChoice(str, Enum):
    v20 = "2.0"
    v21 = "2.1"


class _Bar:
    """Rich progress on stderr (bytes and tensors); silent when stderr is not a terminal."""

    def __init__(self) -> None:
        self.progress: Progress | None = None
        self.task: TaskID | None = None

    def __call__(self, ev) -> None:  # ev: converters.Progress
        if not output.err.is_terminal:
            return
        if self.progress is None:
            self.progress = Progress(TextColumn("[bold]converting"), BarColumn(), DownloadColumn(),
                                     TextColumn("{task.fields[tensors]} tensors"), TransferSpeedColumn(),
                                     TimeRemainingColumn(), console=output.err, transient=True)
            self.progress.start()
            self.task = self.progress.add_task("convert", total=ev.total_bytes, tensors="")
        assert self.task is not None  # added together with self.progress
        self.progress.update(self.task, completed=ev.done_bytes,
                             tensors=f"{ev.done_tensors}/{ev.total_tensors}")

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()


@app.command("convert")
def convert_cmd(
    source: Annotated[str, typer.Argument(help="Checkpoint directory, Hugging Face repo id (org/name) or "
                                          "registry alias (e.g. llada2.1-mini).", show_default=False)],
    out: Annotated[Optional[Path], typer.Option("--output", "-o", help="GGUF file to write "
                                                "(default: $DLLM_HOME/models/<name>-<outtype>.gguf).",
                                                show_default=False)] = None,
    outtype: Annotated[OutTypeChoice, typer.Option("--outtype", help="Tensor type; norms, 1-D tensors and the "
                                                   "router always stay f32.")] = OutTypeChoice.bf16,
    revision: Annotated[Optional[str], typer.Option("--revision", help="Branch, tag or commit of a Hub repo.",
                                                    show_default=False)] = None,
    model_version: Annotated[Optional[VersionChoice], typer.Option(
        "--model-version", help="LLaDA2 version whose decode presets go into the file (default: from the "
        "registry or the model name).", show_default=False)] = None,
    quant: Annotated[Optional[QuantChoice], typer.Option(
        "--quant", help="Quantize with the patched llama.cpp (K-quants; q4_k_moe keeps attention, shared expert "
        "and output at 8 bits and puts the routed experts at 4-5 bits). SRC may also be an f32/f16/bf16 GGUF.",
        show_default=False)] = None,
    force: Annotated[bool, typer.Option("--force", "-f", help="Overwrite an existing output file.")] = False,
) -> None:
    """Convert a LLaDA2.x safetensors checkpoint to GGUF (streams tensors; never loads the whole model).

    Examples:
      dllm convert llada2.1-mini --outtype q8_0
      dllm convert inclusionAI/LLaDA2.0-mini -o mini.gguf
      dllm convert ./my-checkpoint -o tiny.gguf --outtype f32 --force
      dllm convert model-f16.gguf --quant q4_k_m -o model-q4_k_m.gguf
    """
    if quant is not None:
        _quantize(source, out, quant.value, revision, model_version, force)
        return
    from converters import convert  # imported here so `dllm --help` stays fast

    bar = _Bar()
    try:
        res = convert(source, out, outtype=outtype.value, revision=revision,
                      model_version=model_version.value if model_version else None, force=force,
                      progress=bar, warn=lambda m: output.warn(escape(m)))
    finally:
        bar.close()
    size = res.path.stat().st_size
    output.info(escape(f"wrote {res.path} ({res.tensors} tensors, {size / 1e6:.1f} MB, {res.outtype}, "
                       f"LLaDA{res.model_version}) in {res.seconds:.1f}s"))
    output.answer(str(res.path))


def _quantize(source: str, out: Path | None, preset: str, revision: str | None, model_version, force: bool) -> None:
    """GGUF -> quantized GGUF, or checkpoint -> bf16 GGUF (temporary) -> quantized GGUF."""
    import tempfile

    from converters import convert
    from dllm_cli.runtime.quantize import quantize

    src = Path(source)
    if src.suffix == ".gguf" and is_file(src):
        dst = out or src.with_name(f"{src.stem.rsplit('-', 1)[0]}-{preset}.gguf")
        with output.err.status(f"quantizing to {preset} ..."):
            path = quantize(src, dst, preset, force=force)
    else:
        from dllm_cli.registry import models_dir
        dst = out or models_dir() / f"{Path(str(source).rstrip('/')).name}-{preset}.gguf"
        dst = outfiles.check(dst, what="the quantized GGUF", create_parent=True)  # before the conversion
        if dst.exists() and not force:
            raise ConvertError(f"{dst} already exists", "pass --force to overwrite it")
        try:
            staging = tempfile.TemporaryDirectory(dir=dst.parent, prefix=".dllm-quant-", ignore_cleanup_errors=True)
        except OSError as e:
            raise outfiles.write_error(dst, e, "the quantized GGUF") from None
        with staging as tmp:
            bar = _Bar()
            try:
                res = convert(source, Path(tmp) / "src-bf16.gguf", outtype="bf16", revision=revision,
                              model_version=model_version.value if model_version else None, progress=bar,
                              warn=lambda m: output.warn(escape(m)))
            finally:
                bar.close()
            with output.err.status(f"quantizing to {preset} ..."):
                path = quantize(res.path, dst, preset, force=force)
    output.info(escape(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB, {preset})"))
    output.answer(str(path))
