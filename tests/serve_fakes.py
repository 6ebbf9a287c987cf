"""Test doubles for ``dllm serve``: a scripted backend (no model) and a server on a free loopback port."""
from __future__ import annotations

import socket
import threading
import time
from typing import Any, Callable, Iterator

from dllm_cli.decoding.events import BlockEvent, DoneEvent, Event, StartEvent, StepEvent
from dllm_cli.serve import GenerationSpec, ServeSettings, Worker
from dllm_cli.serve.backend import Prepared, step_view
from dllm_cli.serve.connections import ConnectionLimits, bind
from dllm_cli.serve.errors import shutting_down
from dllm_cli.serve.server import make_server
from dllm_cli.serve.validate import ContextInfo

MASK = 0


class ScriptedBackend:
    """Answers each request with ``answer(spec)``, one block per list item (a string is one block).

    Each block takes two steps: the first unmasks the first token, the second the rest and edits one. ``delay``
    seconds pass per step, so a test can disconnect mid-answer; ``prepare_delay`` seconds pass in ``prepare``.
    ``specs`` records what the worker ran; ``prepare_threads`` the threads ``prepare`` ran on.
    """

    model_id = "scripted"

    def __init__(self, answer: Callable[[GenerationSpec], str | list[str]], *, delay: float = 0.0,
                 prepare_delay: float = 0.0, context: ContextInfo = ContextInfo(n_ctx=4096, max_token_chars=16)) -> None:
        self.answer = answer
        self.delay = delay
        self.prepare_delay = prepare_delay
        self.context = context
        self.specs: list[GenerationSpec] = []
        self.prepare_threads: list[threading.Thread] = []
        self.prepare_stopped = 0
        self.steps = 0
        self.closed = False
        self.thread: threading.Thread | None = None

    def prepare(self, spec: GenerationSpec, stopping: Callable[[], bool]) -> Prepared:
        """Takes ``prepare_delay`` seconds, or less when ``stopping()`` turns true (counted in ``prepare_stopped``)."""
        self.prepare_threads.append(threading.current_thread())
        end = time.monotonic() + self.prepare_delay
        while time.monotonic() < end:
            if stopping():
                self.prepare_stopped += 1
                raise shutting_down()
            time.sleep(0.01)
        return Prepared(spec, [])

    def generate(self, job: Prepared, slot: int = 0, cancelled: Any = None) -> Iterator[Event]:
        spec = job.spec
        self.thread = threading.current_thread()
        self.specs.append(spec)
        blocks = self.answer(spec)
        blocks = [blocks] if isinstance(blocks, str) else blocks
        yield StartEvent(3, 0, 4, MASK, 0, len(blocks), {"mode": spec.mode or "quality"})
        ids: list[int] = []
        fwd = 0
        for k, text in enumerate(blocks):
            toks = tuple(range(1, 5))
            for step in range(2):
                time.sleep(self.delay)
                self.steps += 1
                fwd += 1
                canvas = toks[:1] + (MASK,) * 3 if step == 0 else toks
                unmasked = (0,) if step == 0 else (1, 2, 3)
                edited = () if step == 0 else ((0, 9, 1),)
                yield StepEvent(k, step, 4 * k, canvas, unmasked, edited, (0.9,), fwd, k, 3 - 3 * step, 0.01 * fwd)
            ids += [len(text)] * 4
            yield BlockEvent(k, toks, text, fwd, 0.01 * fwd)
        yield DoneEvent(tuple(ids), "".join(blocks), 3, "eos", fwd, len(blocks), fwd, len(blocks), len(ids) / fwd,
                        0.01 * fwd)

    def step_view(self, ev: StepEvent) -> dict[str, Any]:
        return step_view(ev, 3, MASK, lambda t: f"t{t}")

    def close(self) -> None:
        self.closed = True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RunningServer:
    """``dllm serve``'s app over ``open_backend`` on 127.0.0.1, in a thread; ``stop()`` shuts it down."""

    def __init__(self, open_backend: Callable[[], Any], *, settings: ServeSettings | None = None,
                 queue_size: int = 16, parallel: int = 1, limits: ConnectionLimits = ConnectionLimits(),
                 request_timeout_s: float | None = None) -> None:
        settings = settings or ServeSettings()
        self.worker = Worker(open_backend, queue_size=queue_size, parallel=parallel,
                             request_timeout_s=request_timeout_s)
        self.worker.start()
        self.sock = bind("127.0.0.1", 0)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = make_server(self.worker, settings, "127.0.0.1", self.port, log_level="warning", limits=limits)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)
        self.sock.close()
        self.worker.stop()
