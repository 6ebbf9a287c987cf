"""``dllm runtime``: build the patched llama.cpp and show which one is loaded."""
from __future__ import annotations

from enum import Enum
from typing import Annotated

import typer

from dllm_cli.cli import options as O
from dllm_cli.cli import output
from dllm_cli.cli.app import app

runtime_app = typer.Typer(help="Build and inspect the patched llama.cpp runtime.", no_args_is_help=True)
app.add_typer(runtime_app, name="runtime")


class Backend(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"
    metal = "metal"


BackendOpt = Annotated[Backend, typer.Option("--backend", "-b",
                                             help="auto: cuda with nvcc and an NVIDIA driver, metal on macOS, else cpu.")]


@runtime_app.command("build")
def runtime_build(
    backend: BackendOpt = Backend.auto,
    force: Annotated[bool, typer.Option("--force", help="Rebuild even if an up-to-date build is installed.")] = False,
    amx: Annotated[bool, typer.Option("--amx", help="UNSAFE: compile ggml's Intel AMX kernels. Upstream they crash "
                                      "quantized models on Sapphire Rapids class CPUs (llama.cpp #20824); off by default.")] = False,
) -> None:
    """Apply ggml_patch/patches to the pinned llama.cpp and build libllama (only when patches, flags or the CPU changed).

    The library is tuned for this machine's CPU (-march=native) without the AMX kernels; a build is kept per CPU
    class, so a DLLM_HOME shared between machines never loads a library built for another CPU.

    Example: dllm runtime build --backend cpu
    """
    from ggml_patch import build as B

    if amx:
        output.warn("--amx compiles ggml's AMX kernels, which crash quantized models upstream (llama.cpp #20824)")
    with output.err.status("preparing the runtime build", spinner="dots") as st:
        res = B.build(backend.value, force=force, status=lambda msg: st.update(msg), amx=amx)
    if res.built:
        output.info(f"built {res.backend} runtime {res.key} in {res.seconds:.0f} s")
    else:
        output.info(f"{res.backend} runtime {res.key} is up to date")
    output.answer(str(res.path))


@runtime_app.command("info")
def runtime_info(
    backend: BackendOpt = Backend.auto,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON document.")] = False,
    rpc: O.Rpc = None,
) -> None:
    """Show the loaded runtime: library path, backend, devices, patch set, llama.cpp commit, build flags.

    With --rpc, the remote devices of those workers are listed with their memory.

    Example: dllm runtime info --json
    """
    from dllm_cli.runtime.library import load

    rt = load(backend.value)
    if rpc:
        from dllm_cli.runtime import rpc as R

        R.connect(rt, R.parse_endpoints(rpc))
    info = rt.info()
    if as_json:
        output.document(info)
        return
    for k in ("library", "backend", "version", "patchset", "llama_cpp_commit", "llama_cpp_python", "built_at"):
        output.answer(f"{k:17} {info[k]}")
    output.answer(f"{'patches':17} {', '.join(info['patches'])}")
    output.answer(f"{'flags':17} {' '.join(info['flags'])}")
    output.answer(f"{'amx kernels':17} {'on (unsafe, --amx)' if info['amx'] else 'off'}")
    output.answer(f"{'cpu compiled':17} {' '.join(info['cpu_compiled'])}")
    output.answer(f"{'cpu host':17} {' '.join(info['cpu_host'])}")
    for d in info["devices"]:
        mem = f", {d['memory_total'] / 2**30:.1f} GiB" if d["memory_total"] else ""
        output.answer(f"{'device':17} {d['name']} ({d['type']}: {d['description']}{mem})")
