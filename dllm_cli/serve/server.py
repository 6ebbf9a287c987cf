"""Run the app on uvicorn: the socket bound first, logs on stderr (repeats collapsed), the model's worker started
after the bind and stopped last.

uvicorn handles Ctrl-C, SIGTERM and (here) SIGHUP: it stops accepting; requests in flight are cancelled at their
next step and answered 503 (streams end with an error event and ``[DONE]``); then the worker closes the model on
its own thread and the CLI exits as for any signal (130 / 143 / 129, one line).
"""
from __future__ import annotations

import contextlib
import copy
import ipaddress
import logging
import signal
import socket
import sys
import threading
from typing import Any, Callable, Iterator

from dllm_cli import signals
from dllm_cli.serve.app import ServeSettings, create_app
from dllm_cli.serve.backend import Backend
from dllm_cli.serve.connections import (ACCEPT_BATCH, ConnectionLimits, RepeatFilter, bind, fd_ceiling,
                                        lengthen_queue, protocol_class)
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
    """A ``uvicorn.Server`` for the app over ``worker`` (already started), with dllm's signal rules
    (``server_class``). ``on_started(sockets)`` runs once it accepts connections."""
    import uvicorn

    cap = min(limits.max_connections, fd_ceiling())
    limits = ConnectionLimits(cap, limits.header_timeout_s, limits.keep_alive_s)

    server: uvicorn.Server | None = None
    app = create_app(worker, settings, stopping=lambda: server is not None and server.should_exit)
    config = uvicorn.Config(app, host=host, port=port, log_config=log_config(log_level), log_level=log_level,
                            timeout_graceful_shutdown=GRACEFUL_S, access_log=True, http=protocol_class(limits),
                            limit_concurrency=cap + 1, timeout_keep_alive=limits.keep_alive_s,
                            h11_max_incomplete_event_size=16 * 1024, backlog=ACCEPT_BATCH)
    server = server_class(on_started)(config)
    return server


def server_class(on_started: Callable[[list[socket.socket]], None] | None = None) -> type:
    """``uvicorn.Server`` with dllm's signal rules; ``on_started(sockets)`` runs once it accepts connections.

    - SIGHUP stops it like SIGTERM (uvicorn itself only takes INT and TERM; without this a hangup would raise
      out of the event loop with requests in flight).
    - A second Ctrl-C still forces the exit (connections are not waited for) but the app's lifespan is still
      shut down: uvicorn skips that on a forced exit, and the lifespan task, cancelled when the loop closes,
      logged a CancelledError traceback.
    - uvicorn re-raises the signals it caught once it has stopped, last first; here ``signals_seen`` is
      raised by ``serve`` instead, after the model is closed, by dllm's rule (the first TERM/HUP decides
      the exit code, else Ctrl-C's 130).
    """
    import uvicorn

    class Server(uvicorn.Server):  # type: ignore[misc]
        def __init__(self, config: Any) -> None:
            super().__init__(config)
            self.signals_seen: list[int] = []

        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets=sockets)
            listening = [s for srv in self.servers for s in srv.sockets] if sockets is None else sockets
            lengthen_queue(listening)
            if on_started is not None and self.started:
                on_started(listening)

        def handle_exit(self, sig: int, frame: Any) -> None:
            self.signals_seen.append(sig)
            super().handle_exit(sig, frame)

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            hup = getattr(signal, "SIGHUP", None)
            previous: Any = None
            if hup is not None and threading.current_thread() is threading.main_thread():
                previous = signal.signal(hup, self.handle_exit)
            try:
                with super().capture_signals():
                    try:
                        yield
                    finally:
                        getattr(self, "_captured_signals", []).clear()  # serve() raises them, dllm's way
            finally:
                if hup is not None and previous is not None:
                    signal.signal(hup, previous)

        async def shutdown(self, sockets: Any = None) -> None:
            await super().shutdown(sockets=sockets)
            if self.force_exit:
                await self.lifespan.shutdown()

    return Server


def serve(open_backend: Callable[[], Backend], settings: ServeSettings, host: str, port: int, *,
          queue_size: int, parallel: int = 1, log_level: str = "info",
          limits: ConnectionLimits = ConnectionLimits(),
          on_ready: Callable[[Worker, int], None] | None = None) -> None:
    """Bind ``host:port`` (errors raise here, before anything loads), load the model with ``parallel`` slots
    (errors raise here), then serve until Ctrl-C, SIGTERM or SIGHUP, which are raised here (``KeyboardInterrupt``
    / ``signals.Terminated``) once the model is closed. ``on_ready(worker, port)`` runs once connections are
    accepted (``port``: the bound one, also for port 0)."""
    sock = bind(host, port)
    worker = Worker(open_backend, queue_size=queue_size, parallel=parallel,
                    request_timeout_s=settings.ceilings.request_timeout_s)
    server: Any = None
    try:
        worker.start()
        bound = sock.getsockname()[1]
        server = make_server(worker, settings, host, bound, log_level=log_level, limits=limits,
                             on_started=lambda _s: on_ready(worker, bound) if on_ready else None)
        server.run(sockets=[sock])
    finally:
        sock.close()
        # the model's thread closes the model whole, whatever signal arrives meanwhile (deferred, raised after)
        with signals.deferred():
            log = logging.getLogger("dllm.serve")
            log.info("stopping: cancelling queued requests, closing the model")
            thread = getattr(worker, "_thread", None)
            if thread is None or thread.ident is not None:
                worker.stop()
            if thread is not None and thread.is_alive():  # a model call that did not return in time
                signals.hold_native()
            log.info("stopped")
    if server is not None:
        signals.raise_first(server.signals_seen)
