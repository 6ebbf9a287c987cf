"""Run the app on uvicorn: the socket bound first, logs on stderr (repeats collapsed), the model's worker started
after the bind and stopped last.

uvicorn handles Ctrl-C and SIGTERM: it stops accepting; requests in flight are cancelled at their next step and
answered 503 (streams end with an error event and ``[DONE]``); then the worker closes the model on its own
thread and the CLI exits as for any signal (130 / 143).
"""
from __future__ import annotations

import copy
import ipaddress
import logging
import socket
import sys
from typing import Any, Callable

from dllm_cli.serve.app import ServeSettings, create_app
from dllm_cli.serve.backend import Backend
from dllm_cli.serve.connections import BACKLOG, ConnectionLimits, RepeatFilter, bind, fd_ceiling, protocol_class
from dllm_cli.serve.worker import Worker

GRACEFUL_S = 5
LOOPBACK_NAMES = ("localhost",)


def is_loopback(host: str) -> bool:
    if host.lower().rstrip(".") in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _stderr_is_tty() -> bool:
    try:
        return bool(sys.stderr is not None and sys.stderr.isatty())
    except (OSError, ValueError, AttributeError):
        return False


def log_config(level: str = "info") -> dict[str, Any]:
    """uvicorn's logging, with the access log moved from stdout to stderr (stdout carries no logs), and every
    handler behind a ``RepeatFilter`` (a flood of identical errors cannot fill the disk)."""
    from uvicorn.config import LOGGING_CONFIG

    cfg = copy.deepcopy(LOGGING_CONFIG)
    for formatter in cfg["formatters"].values():  # uvicorn would ask stdout, which may be closed (``>&-``)
        formatter["use_colors"] = _stderr_is_tty()
    cfg["filters"] = {"repeats": {"()": RepeatFilter}}
    for handler in cfg["handlers"].values():
        handler["stream"] = "ext://sys.stderr"
        handler["filters"] = ["repeats"]
    cfg["loggers"]["dllm"] = {"handlers": ["default"], "level": level.upper(), "propagate": False}
    cfg["loggers"]["asyncio"] = {"handlers": ["default"], "level": "WARNING", "propagate": False}
    return cfg


def make_server(worker: Worker, settings: ServeSettings, host: str, port: int, *, log_level: str = "info",
                limits: ConnectionLimits = ConnectionLimits(),
                on_started: Callable[[list[socket.socket]], None] | None = None) -> Any:
    """A ``uvicorn.Server`` for the app over ``worker`` (already started). ``on_started(sockets)`` runs once it
    accepts connections."""
    import uvicorn

    cap = min(limits.max_connections, fd_ceiling())
    limits = ConnectionLimits(cap, limits.header_timeout_s, limits.keep_alive_s)

    class Server(uvicorn.Server):
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets=sockets)
            if on_started is not None and self.started:
                on_started([s for srv in self.servers for s in srv.sockets] if sockets is None else sockets)

    server: uvicorn.Server | None = None
    app = create_app(worker, settings, stopping=lambda: server is not None and server.should_exit)
    config = uvicorn.Config(app, host=host, port=port, log_config=log_config(log_level), log_level=log_level,
                            timeout_graceful_shutdown=GRACEFUL_S, access_log=True, http=protocol_class(limits),
                            limit_concurrency=cap + 1, timeout_keep_alive=limits.keep_alive_s,
                            h11_max_incomplete_event_size=16 * 1024, backlog=BACKLOG)
    server = Server(config)
    return server


def serve(open_backend: Callable[[], Backend], settings: ServeSettings, host: str, port: int, *,
          queue_size: int, log_level: str = "info", limits: ConnectionLimits = ConnectionLimits(),
          on_ready: Callable[[Worker, int], None] | None = None) -> None:
    """Bind ``host:port`` (errors raise here, before anything loads), load the model (errors raise here), then
    serve until Ctrl-C or SIGTERM. ``on_ready(worker, port)`` runs once connections are accepted (``port``: the
    bound one, also for port 0)."""
    sock = bind(host, port)
    try:
        worker = Worker(open_backend, queue_size=queue_size, request_timeout_s=settings.ceilings.request_timeout_s)
        worker.start()
    except BaseException:
        sock.close()
        raise
    bound = sock.getsockname()[1]
    try:
        # uvicorn takes SIGINT/SIGTERM while it runs, shuts down, then re-raises the signal to the handlers it
        # found (the CLI's: KeyboardInterrupt / signals.Terminated), which unwind through this ``finally``.
        make_server(worker, settings, host, bound, log_level=log_level, limits=limits,
                    on_started=lambda _s: on_ready(worker, bound) if on_ready else None).run(sockets=[sock])
    finally:
        sock.close()
        log = logging.getLogger("dllm.serve")
        log.info("stopping: cancelling queued requests, closing the model")
        worker.stop()
        log.info("stopped")
