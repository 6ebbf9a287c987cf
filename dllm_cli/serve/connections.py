"""The connection layer under the app: the listening socket, limits on connections, and logs that cannot flood.

- ``bind`` opens the listening socket before the model loads, so a busy port or a bad host is one line at once
  (exit 1, or 2 for a host that is not an address), and ``--port 0`` knows its real port before the banner.
- ``protocol_class`` is uvicorn's h11 protocol with three changes: a connection that has not sent a complete
  request head within ``header_timeout_s`` is closed (idle or slow sockets cannot pile up); a connection beyond
  ``max_connections`` closes the oldest idle one (no request in progress), or itself when every one is busy, so
  file descriptors never run out (accept never fails in a loop) and idle sockets cannot lock clients out; and a
  client that half-closes its side after a complete request (``shutdown(SHUT_WR)``, as
  ``nc`` does) still gets its answer. To tell such a client from one that closed altogether, the server sends an
  interim ``100 Continue`` (which HTTP/1.1 clients must accept and skip) when the end of input arrives, and again
  shortly after: a closed peer answers with a reset, the write fails, and its request is cancelled as before.
- ``RepeatFilter`` lets at most ``burst`` log records of one kind through per ``window_s`` and reports how many it
  dropped.
"""
from __future__ import annotations

import asyncio
import errno
import logging
import resource
import socket
import time
from dataclasses import dataclass
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from dllm_cli.errors import DllmError, UsageError
from dllm_cli.outfiles import describe

PROBE_AFTER_S = (0.0, 0.05, 0.3, 1.5)  # 100 Continue probes after a half-close: a reset comes back within a round trip
log = logging.getLogger("dllm.serve")
FD_RESERVE = 64  # descriptors kept for the model files, logs and the listening socket
# How many connections asyncio accepts per wakeup of the listening socket (``create_server``'s ``backlog``). A
# connection is checked against the limit two loop iterations after its accept (a task makes its transport, which
# calls ``connection_made`` on the next one), and a connection closed there frees its descriptor on the next, while
# the listening socket is read again in each of them: up to ``ACCEPT_IN_FLIGHT`` batches hold descriptors beyond
# the limit. Small batches keep that reserve small (the queue itself is the kernel's, below).
ACCEPT_BATCH = 16
ACCEPT_IN_FLIGHT = 4
# The kernel's queue of connections not yet accepted (capped by net.core.somaxconn). They hold no descriptor of
# ours, so it can be long: when it is full the kernel drops the client's handshake, and the client only tries
# again after its retransmission timeout (1 s, then 3 s on Linux), so a burst of connections stalled the next
# client for a second or more even though the server had room for it by then.
LISTEN_QUEUE = 4096


@dataclass(frozen=True)
class ConnectionLimits:
    max_connections: int = 256
    header_timeout_s: float = 10.0  # for the request line and headers of each request
    keep_alive_s: int = 5  # an idle kept-alive connection is closed after this long


def fd_ceiling() -> int:
    """How many connections the open-file limit leaves room for: ``FD_RESERVE`` for the process and the accepts in
    flight (``ACCEPT_IN_FLIGHT`` batches, see ``ACCEPT_BATCH``) before the protocol can close the ones over the
    limit."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max(1, soft - FD_RESERVE - ACCEPT_IN_FLIGHT * ACCEPT_BATCH) if soft != resource.RLIM_INFINITY else 1 << 20


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` with a ``LISTEN_QUEUE`` long queue; ``UsageError`` for a host that is
    not an address of this machine's resolver, ``DllmError`` for a port in use or not allowed."""
    try:
        infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as e:
        raise UsageError(f"--host {host}: not an address or a name this machine resolves ({e})",
                         "use an address such as 127.0.0.1, ::1 or 0.0.0.0") from None
    if ":" not in host:  # a name such as localhost: IPv4 first, as uvicorn binds it (clients try 127.0.0.1)
        infos.sort(key=lambda info: info[0] != socket.AF_INET)
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(addr)
        sock.listen(LISTEN_QUEUE)
        sock.setblocking(False)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise DllmError(f"port {port} on {host} is already in use", "pick another with --port, or --port 0 "
                            "for any free one") from None
        if e.errno == errno.EACCES:
            raise DllmError(f"not allowed to listen on port {port} on {host}", "use a port above 1023") from None
        if e.errno == errno.EADDRNOTAVAIL:
            raise UsageError(f"--host {host}: not an address of this machine",
                             "use one of its addresses, 127.0.0.1 or 0.0.0.0") from None
        raise DllmError(f"cannot listen on {host}:{port}: {describe(e)}") from None
    return sock


class LimitedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol under ``limits`` (see the module docstring); ``protocol_class`` binds the limits."""

    limits = ConnectionLimits()
    _head_timer: asyncio.TimerHandle | None = None
    _since = 0.0  # when the connection was made (the oldest idle one makes room for a new one)

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._since = time.monotonic()
        if len(self.connections) > self.limits.max_connections:
            others: list[Any] = [c for c in self.connections if c is not self]
            oldest = min((c for c in others if isinstance(c, LimitedH11Protocol) and c.idle()),
                         key=lambda c: c._since, default=None)
            log.warning("connection limit (%d) reached: %s", self.limits.max_connections,
                        "closing the oldest idle connection" if oldest else "closing new connections")
            if oldest is None:
                transport.abort()
                return
            oldest.transport.abort()
        self._arm_head_timer()

    def idle(self) -> bool:
        """No request in progress: nothing sent yet, a partial head, or between kept-alive requests."""
        return (self.conn.their_state is h11.IDLE and (self.cycle is None or self.cycle.response_complete)
                and not self.transport.is_closing())

    def _arm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        self._head_timer = self.loop.call_later(self.limits.header_timeout_s, self._head_timeout)

    def _head_timeout(self) -> None:
        self._head_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()  # no complete request head in time

    def connection_lost(self, exc: Exception | None) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm_head_timer()  # the next request's head has the same deadline

    def eof_received(self) -> bool | None:  # type: ignore[override]
        cycle = self.cycle
        if (cycle is None or cycle.response_complete or cycle.response_started or cycle.more_body
                or self.scope.get("http_version") != "1.1"):
            return None  # uvicorn's way: close, and a request in flight sees its client gone
        cycle.keep_alive = False  # answer this request, then close
        for delay in PROBE_AFTER_S:
            self.loop.call_later(delay, self._probe)
        return True

    def _probe(self) -> None:
        cycle = self.cycle
        if cycle is not None and not cycle.response_started and not self.transport.is_closing():
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")


def lengthen_queue(sockets: list[socket.socket]) -> None:
    """Give the listening ``sockets`` the ``LISTEN_QUEUE`` long kernel queue again: asyncio's ``create_server``
    calls ``listen(backlog)`` with the accept batch, which would also cut the kernel's queue to ``ACCEPT_BATCH``
    (Linux takes a second ``listen`` on a listening socket as a new queue length). ``sockets`` may be asyncio's
    ``TransportSocket`` wrappers, which have no ``listen``: a duplicate descriptor of the same socket does it."""
    for sock in sockets:
        with socket.fromfd(sock.fileno(), sock.family, sock.type) as dup:
            dup.listen(LISTEN_QUEUE)


def protocol_class(limits: ConnectionLimits) -> type[LimitedH11Protocol]:
    """``LimitedH11Protocol`` bound to ``limits`` (a class: uvicorn makes one instance per connection)."""
    return type("LimitedH11Protocol", (LimitedH11Protocol,), {"limits": limits})


class RepeatFilter(logging.Filter):
    """At most ``burst`` records of one kind per ``window_s``; the first one let through after a quiet spell says
    how many were dropped. A kind is the logger, the level and the message template, so one misbehaving client
    cannot fill the disk (accept errors, rejected connections), while distinct access-log lines still pass."""

    def __init__(self, burst: int = 5, window_s: float = 10.0) -> None:
        super().__init__()
        self.burst, self.window_s = burst, window_s
        self._seen: dict[tuple[str, int, str], list[float]] = {}  # kind -> [window start, passed, dropped]

    def filter(self, record: logging.LogRecord) -> bool:
        template = str(record.msg) if record.levelno >= logging.WARNING else record.getMessage()
        kind = (record.name, record.levelno, template)
        now = time.monotonic()
        state = self._seen.get(kind)
        if state is None or now - state[0] >= self.window_s:
            dropped = int(state[2]) if state else 0
            if len(self._seen) > 1000:
                self._seen.clear()
            self._seen[kind] = [now, 1, 0]
            if dropped:
                record.msg = f"{record.msg} (and {dropped} more like it in the last {self.window_s:g} s, not shown)"
            return True
        if state[1] < self.burst:
            state[1] += 1
            return True
        state[2] += 1
        return False
