"""``dllm rpc-server``: a ggml RPC worker that lends this machine's CPU or GPU to a model run elsewhere (``--rpc``)."""
from __future__ import annotations

from enum import Enum
from typing import Annotated, Optional

import typer

from dllm_cli import signals
from dllm_cli.cli import output
from dllm_cli.cli.app import app
from dllm_cli.runtime.threads import default_threads


class WorkerBackend(str, Enum):
    cpu = "cpu"
    cuda = "cuda"
    metal = "metal"


@app.command("rpc-server")
def rpc_server(
    host: Annotated[str, typer.Option("--host", "-H", help="Address to listen on. The RPC protocol has NO "
                                      "authentication: anyone who reaches the port can use this machine.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", "-p", min=1, max=65535, help="TCP port.")] = 50052,
    backend: Annotated[WorkerBackend, typer.Option("--backend", "-b", help="Device to lend: the CPU, or the GPU of "
                                                   "a cuda/metal runtime.")] = WorkerBackend.cpu,
    threads: Annotated[Optional[int], typer.Option("--threads", "-t", min=1, help="CPU threads (default: one per "
                                                   "physical core).")] = None,
) -> None:
    """Serve this machine's device to `dllm run/chat/bench --rpc HOST:PORT` (ggml's RPC backend).

    Layers are split across the local device and every worker; use the same dllm version everywhere. Bind to
    loopback (the default) or a trusted network only.

    Examples:
      dllm rpc-server --port 50052
      dllm rpc-server --host 192.168.1.20 --port 50052     # then elsewhere: dllm run --rpc 192.168.1.20:50052
    """
    import os

    from dllm_cli.runtime import rpc
    from dllm_cli.runtime.library import load

    address = rpc.listen_address(host)  # ggml takes an IPv4 literal only: resolve names first
    shown = host if address == host else f"{host} ({address})"
    if not rpc.is_loopback(address):
        output.warn(f"listening on {shown}: the RPC protocol has no authentication, anyone who can reach "
                    f"{address}:{port} can run code on this machine's device; use a trusted network only")
    rt = load(backend.value)
    devices = rpc.worker_devices(rt, backend.value)
    rpc.listen_check(address, port)
    failure: list[BaseException] = []

    def run() -> None:
        try:
            rpc.serve(rt, address, port, devices, threads or default_threads())
        except BaseException as e:  # handed to the main thread, which reports it
            failure.append(e)

    # ggml's server never returns: on Ctrl-C/TERM/HUP the process ends without C++ static destructors, which
    # would free the backend under a client's computation (a segfault at exit): signals.NativeThread
    worker = signals.NativeThread(run, name="ggml-rpc-server")
    worker.start()
    output.info(f"RPC worker ({backend.value}) listening on {shown}:{port}; Ctrl-C stops it")
    while not worker.finished.wait(0.2):  # the main thread stays in Python so Ctrl-C and SIGTERM act at once
        pass
    if failure:
        raise failure[0]
