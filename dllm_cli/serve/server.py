"""Run the app on uvicorn: logs on stderr, the model's worker started first and stopped last.

uvicorn handles Ctrl-C and SIGTERM: it stops accepting; requests in flight are cancelled at their next step and
answered 503 (streams end with an error event and ``[DONE]``); then the worker closes the model on its own
thread and the CLI exits as for any signal (130 / 143).
"""
from __future__ import annotations

import copy
import ipaddress
import logging
from typing import Any, Callable

from dllm_cli.serve.app import ServeSettings, create_app
from dllm_cli.serve.backend import Backend
from dllm_cli.serve.worker import Worker

GRACEFUL_S = 5
LOOPBACK_NAMES = ("localhost",)


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def log_config(level: str = "info") -> dict[str, Any]:
    """uvicorn's logging, with the access log moved from stdout to stderr (stdout carries no logs)."""
    from uvicorn.config import LOGGING_CONFIG

    cfg = copy.deepcopy(LOGGING_CONFIG)
    for handler in cfg["handlers"].values():
        handler["stream"] = "ext://sys.stderr"
    cfg["loggers"]["dllm"] = {"handlers": ["default"], "level": level.upper(), "propagate": False}
    return cfg


def make_server(worker: Worker, settings: ServeSettings, host: str, port: int, *, log_level: str = "info") -> Any:
    """A ``uvicorn.Server`` for the app over ``worker`` (already started)."""
    import uvicorn

    server: uvicorn.Server | None = None
    app = create_app(worker, settings, stopping=lambda: server is not None and server.should_exit)
    config = uvicorn.Config(app, host=host, port=port, log_config=log_config(log_level), log_level=log_level,
                            timeout_graceful_shutdown=GRACEFUL_S, access_log=True)
    server = uvicorn.Server(config)
    return server


def serve(open_backend: Callable[[], Backend], settings: ServeSettings, host: str, port: int, *,
          queue_size: int, parallel: int = 1, log_level: str = "info",
          on_ready: Callable[[Worker], None] | None = None) -> None:
    """Load the model (errors raise here), then serve until Ctrl-C or SIGTERM."""
    worker = Worker(open_backend, queue_size=queue_size, parallel=parallel)
    worker.start()
    try:
        if on_ready is not None:
            on_ready(worker)
        # uvicorn takes SIGINT/SIGTERM while it runs, shuts down, then re-raises the signal to the handlers it
        # found (the CLI's: KeyboardInterrupt / signals.Terminated), which unwind through this ``finally``.
        make_server(worker, settings, host, port, log_level=log_level).run()
    finally:
        log = logging.getLogger("dllm.serve")
        log.info("stopping: cancelling queued requests, closing the model")
        worker.stop()
        log.info("stopped")
