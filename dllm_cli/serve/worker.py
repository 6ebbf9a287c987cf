"""One model, many clients: up to ``parallel`` requests decode at once, the rest wait in a FIFO queue.

A request first takes a queue slot (429 when none is left), is then prepared (chat template, tokenizer, decode
config, compiled constraint) on a separate preparation thread, never on the model's, then waits for a decoding
slot. The worker's thread ("dllm-model") owns the backend: it opens and closes it, admits prepared jobs into
free slots (the backend picks the slot holding the longest prefix of the prompt), and pumps the backend's
scheduler, which batches every active request's next step, commit or prefill chunk into one decode per tick
(``runtime.scheduler``). Each active request iterates its own event stream on a slot thread ("dllm-slot-N").
Each ``Job`` carries its events back to the event loop that submitted it. Cancelling a job (its client went
away) frees its queue slot at once; an active one is cancelled at the next tick and its slot freed, and so is
one that runs past the request timeout.
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import threading
import time
from typing import Any, Callable

from dllm_cli.decoding.events import Event, StepEvent
from dllm_cli.errors import DllmError
from dllm_cli.runtime.scheduler import Cancelled
from dllm_cli.serve.backend import Backend, GenerationSpec, Prepared
from dllm_cli.serve.errors import queue_full, shutting_down
from dllm_cli.serve.validate import ContextInfo

log = logging.getLogger("dllm.serve")
END = None  # the last item a job receives
Item = tuple[Event, dict[str, Any] | None] | BaseException | None
IDLE_S = 0.05  # longest wait of the model's thread before it looks at the queue again


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
        self.holds_slot = False  # a queue slot; guarded by the worker's lock
        self.on_cancel: Callable[[Job], None] | None = None
        self._loop = loop

    def post(self, item: Item) -> None:
        """Hand an item to the submitting event loop (called from the worker's threads)."""
        try:
            self._loop.call_soon_threadsafe(self.items.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            self.cancelled.set()

    def cancel(self) -> None:
        """Stop this job: its queue slot is freed now, an active job stops at the next tick."""
        self.cancelled.set()
        if self.on_cancel is not None:
            self.on_cancel(self)


class Worker:
    """The model's thread, its slots, its preparation thread and its queue. ``start`` opens the backend (its
    errors raise there).

    ``parallel`` bounds the active requests (the backend's ``slots`` may bound it further); ``queue_size``
    bounds the waiting ones, preparing or prepared (HTTP 429 beyond); ``request_timeout_s`` ends an active job
    after this many seconds (None: no limit).
    """

    def __init__(self, open_backend: Callable[[], Backend], *, queue_size: int = 16, parallel: int = 1,
                 request_timeout_s: float | None = None) -> None:
        self.open_backend = open_backend
        self.queue_size = queue_size
        self.parallel = parallel
        self.request_timeout_s = request_timeout_s
        self.model_id = ""
        self.context = ContextInfo()
        self.backend: Backend | None = None
        self._reserved = 0  # queue slots held (preparing or waiting for a decoding slot)
        self._waiting: collections.deque[Job] = collections.deque()  # prepared, FIFO
        self._active: dict[int, Job] = {}  # slot -> job
        self._threads: dict[int, threading.Thread] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = threading.Event()  # no more submissions or admissions
        self._closing = False  # preparation has ended: the model's thread may close the backend
        self._ready = threading.Event()
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
        """Answer waiting jobs 503, cancel active ones, let a preparation in progress stop at its next piece,
        then let the model's thread close the backend and end."""
        with self._lock:
            self._stopping.set()
            waiting, self._waiting = list(self._waiting), collections.deque()
            active = list(self._active.values())
        for job in active:
            job.cancel()
        self._prep.shutdown(wait=True, cancel_futures=True)  # the model must outlive any use of its tokenizer
        with self._lock:
            self._closing = True
        for job in waiting:
            self._release(job)
            job.post(shutting_down())
            job.post(END)
        self._wake.set()
        self._thread.join(timeout)

    # --- queue -----------------------------------------------------------------------------
    def reserve(self, job: Job) -> None:
        """Give ``job`` a queue slot, held until a decoding slot takes it or it is cancelled; 429 when none
        is left."""
        with self._lock:
            if self._reserved >= self.queue_size:
                raise queue_full(self.queue_size)
            self._reserved += 1
            job.holds_slot = True
        job.on_cancel = self._release

    def _release(self, job: Job) -> None:
        with self._lock:
            if job.holds_slot:
                job.holds_slot = False
                self._reserved -= 1

    async def prepare(self, job: Job, stopping: Callable[[], bool] = lambda: False) -> None:
        """Template, tokenize and configure ``job`` on the preparation thread (one at a time, bounded by the
        context size; it stops early once ``stopping()`` or the worker's ``stop``); its errors (``ApiError``,
        ``DllmError``) raise here."""
        assert self.backend is not None
        halt = self._stopping.is_set

        def stop_now() -> bool:
            return halt() or stopping() or job.cancelled.is_set()
        try:
            future = self._prep.submit(self.backend.prepare, job.spec, stop_now)
        except RuntimeError:  # the executor is shut down
            raise shutting_down() from None
        job.prepared = await asyncio.wrap_future(future)

    def submit(self, job: Job) -> None:
        """Queue a reserved, prepared ``job`` for a decoding slot (FIFO)."""
        with self._lock:
            if self._stopping.is_set():
                raise shutting_down()
            self._waiting.append(job)
        self._wake.set()

    def status(self) -> dict[str, Any]:
        """``waiting`` (queue slots held), ``running`` (= ``active``), ``limit`` (queue size), ``parallel`` and
        per-slot ``slots`` (``{"slot", "busy", "prefix_tokens"}``: tokens of KV prefix each slot holds)."""
        with self._lock:
            active, waiting = len(self._active), self._reserved
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
            self.model_id, self.context = backend.model_id, backend.context
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
                    if self._closing and not self._active:
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
        """Move waiting jobs into free slots, each on its own slot thread (the job's queue slot is freed)."""
        while True:
            with self._lock:
                free = [s for s in range(self._n_slots()) if s not in self._active]
                if not free or not self._waiting or self._stopping.is_set():
                    return
                job = self._waiting.popleft()
            self._release(job)
            if job.cancelled.is_set() or job.prepared is None:
                job.post(END)
                continue
            choose = getattr(backend, "choose_slot", None)
            slot = free[0]
            if choose is not None:
                try:
                    slot = choose(job.prepared, free)
                except Exception:  # never take the worker down: generate reports a bad job to its client
                    log.exception("choosing a slot failed")
                    slot = free[0]
            with self._lock:
                self._active[slot] = job
                t = self._threads[slot] = threading.Thread(target=self._serve, args=(backend, job, slot),
                                                           name=f"dllm-slot-{slot}", daemon=True)
            t.start()

    def _serve(self, backend: Backend, job: Job, slot: int) -> None:
        """A slot thread: iterate the job's events, hand them to its client, free the slot at the end."""
        assert job.prepared is not None
        limit = self.request_timeout_s
        deadline = time.monotonic() + limit if limit else float("inf")

        def ended() -> bool:  # the scheduler drops this slot's work at the next tick once true
            return job.cancelled.is_set() or time.monotonic() > deadline

        def timed_out() -> bool:
            if job.cancelled.is_set() or time.monotonic() <= deadline:
                return False
            job.timed_out = True
            log.info("request ended at the request timeout (%g s): finish_reason \"length\"", limit)
            return True

        events = backend.generate(job.prepared, slot, ended)
        try:
            for ev in events:
                if job.cancelled.is_set():
                    log.info("request cancelled (client gone or stop string reached)")
                    break
                if timed_out():
                    break
                view = backend.step_view(ev) if job.spec.events and isinstance(ev, StepEvent) else None
                job.post((ev, view))
        except Cancelled:
            if not timed_out():
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
