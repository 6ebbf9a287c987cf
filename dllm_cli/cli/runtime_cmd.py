"""``dllm runtime``: build the patched llama.cpp and show which one is loaded."""
from __future__ import annotations

from enum import Enum
from typing import Annotated

import typer

from ggml_patch import backends as BK

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
    vulkan = "vulkan"


class CudaToolkit(str, Enum):
    auto = "auto"
    system = "system"
    pip = "pip"


BackendOpt = Annotated[Backend, typer.Option("--backend", "-b",
                                             help="auto: cuda with an NVIDIA driver and nvcc (system or the [cuda] "
                                                  "extra's pip wheels), metal on macOS, vulkan with a Vulkan GPU "
                                                  "(not a software device) and glslc, else cpu.")]


@runtime_app.command("build")
def runtime_build(
    backend: BackendOpt = Backend.auto,
    force: Annotated[bool, typer.Option("--force", help="Rebuild even if an up-to-date build is installed.")] = False,
    amx: Annotated[bool, typer.Option("--amx", help="UNSAFE: compile ggml's Intel AMX kernels. Upstream they crash "
                                      "quantized models on Sapphire Rapids class CPUs (llama.cpp #20824); off by default.")] = False,
    cuda_arch: Annotated[str | None, typer.Option(
        "--cuda-arch", metavar="LIST",
        help="CUDA architectures, e.g. 80;86;90 or 90-real;75-virtual, or native. Default: the visible GPUs, "
             "else 75-virtual;80-real;86-real;89-real;90.")] = None,
    cuda_toolkit: Annotated[CudaToolkit, typer.Option(
        "--cuda-toolkit", help="Where nvcc comes from: auto (system, then the pip wheels of "
                               "pip install 'dllm-cli[cuda]'), system or pip.")] = CudaToolkit.auto,
) -> None:
    """Apply ggml_patch/patches to the pinned llama.cpp and build libllama (only when patches, flags or the CPU changed).

    The library is tuned for this machine's CPU (-march=native) without the AMX kernels; a build is kept per CPU
    class, so a DLLM_HOME shared between machines never loads a library built for another CPU.

    CUDA without a system toolkit: pip install 'dllm-cli[cuda]' brings nvcc, cudart and cuBLAS as pip wheels
    (CUDA 13: NVIDIA driver 580 or newer at run time).

    Example: dllm runtime build --backend cpu
    Example: dllm runtime build --backend cuda --cuda-arch 86
    """
    from ggml_patch import build as B

    if amx:
        output.warn("--amx compiles ggml's AMX kernels, which crash quantized models upstream (llama.cpp #20824)")
    with output.err.status("preparing the runtime build", spinner="dots") as st:
        res = B.build(backend.value, force=force, status=lambda msg: st.update(msg), amx=amx, cuda_arch=cuda_arch,
                      cuda_toolkit_source=cuda_toolkit.value)
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
    t = info.get("threads")
    if t:  # absent from the info of a library that cannot say (test doubles, older callers)
        output.answer(f"{'threads':17} {t['default_threads']} by default (--threads N overrides): "
                      f"{t['physical_cores']} physical cores of {t['logical_cpus']} logical CPUs usable")
        output.answer(f"{'thread wait':17} {t['wait']}")
    for line in cuda_lines(info.get("cuda")) + BK.VULKAN.info_lines(info.get("vulkan")):
        output.answer(line)
    for d in info["devices"]:
        mem = f", {d['memory_total'] / 2**30:.1f} GiB" if d["memory_total"] else ""
        output.answer(f"{'device':17} {d['name']} ({d['type']}: {d['description']}{mem})")


def cuda_lines(cuda: dict | None) -> list[str]:
    """``cuda archs`` and ``cuda toolkit`` lines of ``dllm runtime info`` (none for other backends)."""
    return BK.CUDA.info_lines(cuda)
