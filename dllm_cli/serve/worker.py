"""One model, many clients: up to ``parallel`` requests decode at once, the rest wait in a FIFO queue.

The worker's thread ("dllm-model") owns the backend: it opens and closes it, admits waiting jobs into free
slots (the backend picks the slot holding the longest prefix of the prompt), and pumps the backend's scheduler,
which batches every active request's next step, commit or prefill chunk into one decode per tick
(``runtime.scheduler``). Each active request iterates its own event stream on a slot thread
("dllm-slot-N"); a job whose client went away is cancelled at the next tick and its slot freed.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import threading
from typing import Any, Callable

from dllm_cli.decoding.events import Event, StepEvent
from dllm_cli.errors import DllmError
from dllm_cli.runtime.scheduler import Cancelled
from dllm_cli.serve.backend import Backend, GenerationSpec
from dllm_cli.serve.errors import ApiError, queue_full

log = logging.getLogger("dllm.serve")
END = None  # the last item a job receives
Item = tuple[Event, dict[str, Any] | None] | BaseException | None
IDLE_S = 0.05  # longest wait of the model's thread before it looks at the queue again


class Job:
    """A request in the queue; ``items`` yields ``(event, step_view)`` tuples, an exception, then ``END``."""

    def __init__(self, spec: GenerationSpec, loop: asyncio.AbstractEventLoop) -> None:
        self.spec = spec
        self.items: asyncio.Queue[Item] = asyncio.Queue()
        self.cancelled = threading.Event()
        self._loop = loop

    def post(self, item: Item) -> None:
        """Hand an item to the submitting event loop (called from the worker's threads)."""
        try:
            self._loop.call_soon_threadsafe(self.items.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            self.cancelled.set()

    def cancel(self) -> None:
        self.cancelled.set()


class Worker:
    """The model's thread, its slots and its queue. ``start`` opens the backend (its errors raise there).

    ``parallel`` bounds the active requests (the backend's ``slots`` may bound it further); ``queue_size``
    bounds the waiting ones (HTTP 429 beyond).
    """

    def __init__(self, open_backend: Callable[[], Backend], *, queue_size: int = 16, parallel: int = 1) -> None:
        self.open_backend = open_backend
        self.queue_size = queue_size
        self.parallel = parallel
        self.model_id = ""
        self.backend: Backend | None = None
        self._waiting: collections.deque[Job] = collections.deque()
        self._active: dict[int, Job] = {}  # slot -> job
        self._threads: dict[int, threading.Thread] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = False
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="dllm-model", daemon=True)

    # --- lifetime (called from the server's thread) ----------------------------------------
    def start(self) -> None:
        """Start the thread and wait until the model is loaded; re-raise a loading error here."""
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            self._thread.join()
            raise self._error

    def stop(self, timeout: float = 30.0) -> None:
        """Answer waiting jobs 503, cancel active ones, then let the thread close the backend and end."""
        with self._lock:
            self._stopping = True
            waiting, self._waiting = list(self._waiting), collections.deque()
            for job in self._active.values():
                job.cancel()
        for job in waiting:
            job.post(ApiError(503, "the server is shutting down", type="server_error", code="shutting_down"))
            job.post(END)
        self._wake.set()
        self._thread.join(timeout)

    # --- queue -----------------------------------------------------------------------------
    def submit(self, job: Job) -> None:
        """Queue ``job`` (FIFO); ``ApiError`` 429 when ``queue_size`` jobs are already waiting."""
        with self._lock:
            if len(self._waiting) >= self.queue_size:
                raise queue_full(self.queue_size)
            self._waiting.append(job)
        self._wake.set()

    def status(self) -> dict[str, Any]:
        """``waiting``, ``running`` (= ``active``), ``limit`` (queue size), ``parallel`` and per-slot
        ``slots`` (``{"slot", "busy", "prefix_tokens"}``: tokens of KV prefix each slot holds)."""
        with self._lock:
            active, waiting = len(self._active), len(self._waiting)
            busy = set(self._active)
        info = getattr(self.backend, "slot_info", None)
        slots = [dict(s, busy=s["slot"] in busy) for s in info()] if info is not None else []
        return {"waiting": waiting, "running": active, "active": active, "limit": self.queue_size,
                "parallel": self._n_slots(), "slots": slots}

    def _n_slots(self) -> int:
        return max(1, min(self.parallel, int(getattr(self.backend, "slots", self.parallel))))

    # --- the model's thread ------------------------------------------------------------------
    def _main(self) -> None:
        try:
            backend = self.open_backend()
            self.backend = backend
            self.model_id = backend.model_id
        except BaseException as e:  # reported by start()
            self._error = e
            self._ready.set()
            return
        self._ready.set()
        pump = getattr(backend, "pump", None)
        try:
            while True:
                self._admit(backend)
                with self._lock:
                    if self._stopping and not self._active:
                        break
                    active = bool(self._active)
                if active and pump is not None:
                    try:
                        pump(IDLE_S)
                    except Exception:  # its requests got the error; the server goes on
                        log.exception("a scheduler tick failed")
                else:
                    self._wake.wait(IDLE_S)
                self._wake.clear()
        finally:
            for t in list(self._threads.values()):
                t.join()
            backend.close()

    def _admit(self, backend: Backend) -> None:
        """Move waiting jobs into free slots, each on its own slot thread."""
        while True:
            with self._lock:
                free = [s for s in range(self._n_slots()) if s not in self._active]
                if not free or not self._waiting or self._stopping:
                    return
                job = self._waiting.popleft()
            if job.cancelled.is_set():
                job.post(END)
                continue
            choose = getattr(backend, "choose_slot", None)
            slot = free[0]
            if choose is not None:
                try:
                    slot = choose(job.spec, free)
                except Exception:  # a bad prompt: generate raises it again on the slot thread, to the client
                    slot = free[0]
            with self._lock:
                self._active[slot] = job
                t = self._threads[slot] = threading.Thread(target=self._serve, args=(backend, job, slot),
                                                           name=f"dllm-slot-{slot}", daemon=True)
            t.start()

    def _serve(self, backend: Backend, job: Job, slot: int) -> None:
        """A slot thread: iterate the job's events, hand them to its client, free the slot at the end."""
        events = backend.generate(job.spec, slot, job.cancelled.is_set)
        try:
            for ev in events:
                if job.cancelled.is_set():
                    log.info("request cancelled (client gone or stop string reached)")
                    break
                view = backend.step_view(ev) if job.spec.events and isinstance(ev, StepEvent) else None
                job.post((ev, view))
        except Cancelled:
            log.info("request cancelled (client gone or server stopping)")
        except DllmError as e:
            job.post(e)
        except Exception as e:  # never take the worker down: the client gets a 500, the log the traceback
            log.exception("generation failed")
            job.post(e)
        finally:
            close = getattr(events, "close", None)  # a generator: runs the backend's cleanup on this thread
            if close is not None:
                close()
            job.post(END)
            with self._lock:
                self._active.pop(slot, None)
                self._threads.pop(slot, None)
            self._wake.set()
