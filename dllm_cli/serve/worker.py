"""One model, many clients: a FIFO queue served by the one thread that owns the model.

llama.cpp contexts are not thread-safe, so the backend is opened, used and closed on the model's thread. A request
first takes a queue slot (429 when none is left), is then prepared (chat template, tokenizer, decode config) on a
separate preparation thread, then waits for the model. Each ``Job`` carries its events back to the event loop that
submitted it. Cancelling a job (its client went away) frees its queue slot at once; a running one stops at the
next event (one decoding step), and so does one that runs past the request timeout. The backend leaves its KV
cache consistent either way.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from typing import Any, Callable

from dllm_cli.decoding.events import Event, StepEvent
from dllm_cli.errors import DllmError
from dllm_cli.serve.backend import Backend, GenerationSpec, Prepared
from dllm_cli.serve.errors import queue_full, shutting_down
from dllm_cli.serve.validate import ContextInfo

log = logging.getLogger("dllm.serve")
END = None  # the last item a job receives
Item = tuple[Event, dict[str, Any] | None] | BaseException | None


class Job:
    """A request in the queue; ``items`` yields ``(event, step_view)`` tuples, an exception, then ``END``.

    ``timed_out`` turns true when the worker ended it at the request timeout.
    """

    def __init__(self, spec: GenerationSpec, loop: asyncio.AbstractEventLoop) -> None:
        self.spec = spec
        self.prepared: Prepared | None = None
        self.items: asyncio.Queue[Item] = asyncio.Queue()
        self.cancelled = threading.Event()
        self.timed_out = False
        self.holds_slot = False  # guarded by the worker's lock
        self.on_cancel: Callable[[Job], None] | None = None
        self._loop = loop

    def post(self, item: Item) -> None:
        """Hand an item to the submitting event loop (called from the worker thread)."""
        try:
            self._loop.call_soon_threadsafe(self.items.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            self.cancelled.set()

    def cancel(self) -> None:
        """Stop this job: its queue slot is freed now, a running job stops at its next step."""
        self.cancelled.set()
        if self.on_cancel is not None:
            self.on_cancel(self)


class Worker:
    """The model's thread, its preparation thread and its queue. ``start`` opens the backend (errors raise there).

    ``request_timeout_s``: a running job is ended after this many seconds on the model (None: no limit).
    """

    def __init__(self, open_backend: Callable[[], Backend], *, queue_size: int = 16,
                 request_timeout_s: float | None = None) -> None:
        self.open_backend = open_backend
        self.queue_size = queue_size
        self.request_timeout_s = request_timeout_s
        self.model_id = ""
        self.context = ContextInfo()
        self._backend: Backend | None = None
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._lock = threading.Lock()
        self._waiting = 0
        self._running: Job | None = None
        self._ready = threading.Event()
        self._stopping = threading.Event()
        self._error: BaseException | None = None
        self._prep = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="dllm-prepare")
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
        """Cancel waiting and running jobs, let a preparation in progress stop at its next piece, then let the
        model's thread close the backend and end."""
        self._stopping.set()
        with self._lock:
            running = self._running
        if running is not None:
            running.cancel()
        self._prep.shutdown(wait=True, cancel_futures=True)  # the model must outlive any use of its tokenizer
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.post(shutting_down())
                job.post(END)
        self._queue.put(None)
        self._thread.join(timeout)

    # --- queue -----------------------------------------------------------------------------
    def reserve(self, job: Job) -> None:
        """Give ``job`` a queue slot, held until the model takes it or it is cancelled; 429 when none is left."""
        with self._lock:
            if self._waiting >= self.queue_size:
                raise queue_full(self.queue_size)
            self._waiting += 1
            job.holds_slot = True
        job.on_cancel = self._release

    def _release(self, job: Job) -> None:
        with self._lock:
            if job.holds_slot:
                job.holds_slot = False
                self._waiting -= 1

    async def prepare(self, job: Job, stopping: Callable[[], bool] = lambda: False) -> None:
        """Template, tokenize and configure ``job`` on the preparation thread (one at a time, bounded by the
        context size; it stops early once ``stopping()`` or the worker's ``stop``); its errors (``ApiError``,
        ``DllmError``) raise here."""
        assert self._backend is not None
        halt = self._stopping.is_set

        def stop_now() -> bool:
            return halt() or stopping() or job.cancelled.is_set()
        try:
            future = self._prep.submit(self._backend.prepare, job.spec, stop_now)
        except RuntimeError:  # the executor is shut down
            raise shutting_down() from None
        job.prepared = await asyncio.wrap_future(future)

    def submit(self, job: Job) -> None:
        """Queue a reserved, prepared ``job`` for the model (FIFO)."""
        if self._stopping.is_set():
            raise shutting_down()
        self._queue.put(job)

    def status(self) -> dict[str, int]:
        with self._lock:
            return {"waiting": self._waiting, "running": int(self._running is not None), "limit": self.queue_size}

    # --- the thread ------------------------------------------------------------------------
    def _main(self) -> None:
        try:
            backend = self._backend = self.open_backend()
            self.model_id, self.context = backend.model_id, backend.context
        except BaseException as e:  # reported by start()
            self._error = e
            self._ready.set()
            return
        self._ready.set()
        try:
            while (job := self._queue.get()) is not None:
                self._release(job)
                with self._lock:
                    self._running = job
                try:
                    self._serve(backend, job)
                finally:
                    with self._lock:
                        self._running = None
        finally:
            backend.close()

    def _serve(self, backend: Backend, job: Job) -> None:
        if job.cancelled.is_set() or job.prepared is None:
            job.post(END)
            return
        deadline = time.monotonic() + self.request_timeout_s if self.request_timeout_s else float("inf")
        events = backend.generate(job.prepared)
        try:
            for ev in events:
                if job.cancelled.is_set():
                    log.info("request cancelled (client gone or stop string reached)")
                    break
                if time.monotonic() > deadline:
                    job.timed_out = True
                    log.info("request ended at the request timeout (%g s): finish_reason \"length\"",
                             self.request_timeout_s)
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
