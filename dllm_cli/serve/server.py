"""Run the app on uvicorn: logs on stderr, the model's worker started first and stopped last.

uvicorn handles Ctrl-C and SIGTERM: it stops accepting, ends open streams and waits (up to
``GRACEFUL_S``) for requests in flight; then the worker cancels what is left and closes the model on its
own thread.
"""
from __future__ import annotations

import copy
import ipaddress
import logging
import signal
import threading
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
          queue_size: int, log_level: str = "info", on_ready: Callable[[Worker], None] | None = None) -> None:
    """Load the model (errors raise here), then serve until Ctrl-C or SIGTERM."""
    worker = Worker(open_backend, queue_size=queue_size)
    worker.start()
    # uvicorn re-raises SIGTERM once it has shut down, which would kill the process before the worker closes
    # the model; a no-op handler underneath makes that re-raise return, so SIGTERM ends with exit 0 after cleanup.
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, lambda *_: None) if main else None
    try:
        if on_ready is not None:
            on_ready(worker)
        make_server(worker, settings, host, port, log_level=log_level).run()
    finally:
        log = logging.getLogger("dllm.serve")
        log.info("stopping: cancelling queued requests, closing the model")
        worker.stop()
        if main:
            signal.signal(signal.SIGTERM, previous)
        log.info("stopped")
