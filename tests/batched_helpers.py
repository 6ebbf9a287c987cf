"""Drive several requests through one ``Scheduler`` at once (a thread per request, the caller pumps), and
the same requests alone through a single-sequence ``Session``, for the batched-exactness tests."""
from __future__ import annotations

import threading
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from dllm_cli.decoding import engine
from dllm_cli.decoding.config import DecodeConfig
from dllm_cli.decoding.events import DoneEvent, Event, StepEvent
from dllm_cli.runtime.scheduler import Scheduler


@dataclass
class Req:
    """One request: prompt ids, config; ``start_tick`` delays it; ``cancel_after`` steps cancels it."""

    ids: list[int]
    config: DecodeConfig
    slot: int = 0
    start_tick: int = 0
    cancel_after: int | None = None
    events: list[Event] = field(default_factory=list)
    error: BaseException | None = None
    cancelled: bool = False


def key(ev: Event) -> Any:
    """What must agree between a batched and an alone decode: everything but wall time."""
    if isinstance(ev, StepEvent):
        return replace(ev, elapsed_s=0.0)
    if isinstance(ev, DoneEvent):
        return replace(ev, elapsed_s=0.0)
    return ev.to_dict() | {"elapsed_s": 0.0} if hasattr(ev, "elapsed_s") else ev.to_dict()


def alone(session: Any, req: Req) -> list[Any]:
    session.reset()
    rng = np.random.default_rng(req.config.seed)
    return [key(ev) for ev in engine.generate(session, req.ids, req.config, rng=rng)]


def run_batched(sched: Scheduler, reqs: list[Req], timeout: float = 600.0) -> None:
    """Run ``reqs`` concurrently: each on its slot's thread, started at its ``start_tick``."""
    threads: list[threading.Thread] = []

    def body(r: Req) -> None:
        flag = threading.Event()
        try:
            with sched.attached(r.slot, flag.is_set) as model:
                rng = np.random.default_rng(r.config.seed)
                steps = 0
                for ev in engine.generate(model, r.ids, r.config, rng=rng):
                    r.events.append(ev)
                    steps += isinstance(ev, StepEvent)
                    if r.cancel_after is not None and steps >= r.cancel_after:
                        flag.set()
                        r.cancelled = True
        except BaseException as e:  # recorded; a cancelled request ends with Cancelled
            r.error = e

    pending = sorted(reqs, key=lambda r: r.start_tick)
    import time
    deadline = time.monotonic() + timeout
    while pending or any(t.is_alive() for t in threads):
        while pending and pending[0].start_tick <= sched.ticks:
            t = threading.Thread(target=body, args=(pending.pop(0),), daemon=True)
            t.start()
            threads.append(t)
            time.sleep(0.002)
        sched.pump(0.01)
        assert time.monotonic() < deadline, "batched run timed out"
