"""One model, many clients: a FIFO queue served by the one thread that owns the model.

llama.cpp contexts are not thread-safe, so the backend is opened, used and closed on the worker thread. Each
``Job`` carries its events back to the event loop that submitted it; a job whose client went away is cancelled
at the next event (one decoding step) and its KV cache is left consistent by the backend.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
from typing import Any, Callable

from dllm_cli.decoding.events import Event, StepEvent
from dllm_cli.errors import DllmError
from dllm_cli.serve.backend import Backend, GenerationSpec
from dllm_cli.serve.errors import ApiError, queue_full

log = logging.getLogger("dllm.serve")
END = None  # the last item a job receives
Item = tuple[Event, dict[str, Any] | None] | BaseException | None


class Job:
    """A request in the queue; ``items`` yields ``(event, step_view)`` tuples, an exception, then ``END``."""

    def __init__(self, spec: GenerationSpec, loop: asyncio.AbstractEventLoop) -> None:
        self.spec = spec
        self.items: asyncio.Queue[Item] = asyncio.Queue()
        self.cancelled = threading.Event()
        self._loop = loop

    def post(self, item: Item) -> None:
        """Hand an item to the submitting event loop (called from the worker thread)."""
        try:
            self._loop.call_soon_threadsafe(self.items.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            self.cancelled.set()

    def cancel(self) -> None:
        self.cancelled.set()


class Worker:
    """The model's thread and its queue. ``start`` opens the backend (its errors raise there)."""

    def __init__(self, open_backend: Callable[[], Backend], *, queue_size: int = 16) -> None:
        self.open_backend = open_backend
        self.queue_size = queue_size
        self.model_id = ""
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._lock = threading.Lock()
        self._waiting = 0
        self._running: Job | None = None
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
        """Cancel waiting and running jobs, then let the thread close the backend and end."""
        with self._lock:
            running = self._running
        if running is not None:
            running.cancel()
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.post(ApiError(503, "the server is shutting down", type="server_error", code="shutting_down"))
                job.post(END)
        self._queue.put(None)
        self._thread.join(timeout)

    # --- queue -----------------------------------------------------------------------------
    def submit(self, job: Job) -> None:
        """Queue ``job`` (FIFO); ``ApiError`` 429 when ``queue_size`` jobs are already waiting."""
        with self._lock:
            if self._waiting >= self.queue_size:
                raise queue_full(self.queue_size)
            self._waiting += 1
        self._queue.put(job)

    def status(self) -> dict[str, int]:
        with self._lock:
            return {"waiting": self._waiting, "running": int(self._running is not None), "limit": self.queue_size}

    # --- the thread ------------------------------------------------------------------------
    def _main(self) -> None:
        try:
            backend = self.open_backend()
            self.model_id = backend.model_id
        except BaseException as e:  # reported by start()
            self._error = e
            self._ready.set()
            return
        self._ready.set()
        try:
            while (job := self._queue.get()) is not None:
                with self._lock:
                    self._waiting -= 1
                    self._running = job
                try:
                    self._serve(backend, job)
                finally:
                    with self._lock:
                        self._running = None
        finally:
            backend.close()

    def _serve(self, backend: Backend, job: Job) -> None:
        if job.cancelled.is_set():
            job.post(END)
            return
        events = backend.generate(job.spec)
        try:
            for ev in events:
                if job.cancelled.is_set():
                    log.info("request cancelled (client gone or stop string reached)")
                    break
                view = backend.step_view(ev) if job.spec.events and isinstance(ev, StepEvent) else None
                job.post((ev, view))
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
