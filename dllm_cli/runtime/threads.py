"""How ggml's CPU threads share the machine: the default thread count, and how a thread waits at a barrier.

The patched runtime is built with OpenMP (llama-cpp-python's default), so ggml's threads meet at a libgomp barrier
after every graph node, and ggml's own threadpool ``poll`` setting does not apply. libgomp's default is to spin
~300 000 rounds (milliseconds) before it sleeps. On a machine where the scheduler gives a core to other work, the
thread that arrives first spins away its own share while its partner waits for a core: the 4x slowdown of issue 28
with one busy process per core, and worse with a multi-threaded background job. A short spin keeps the idle speed
(the partner arrives within microseconds) and lets a waiting thread sleep, so its core runs the other work and
the scheduler wakes it promptly when the partner arrives (docs/PERFORMANCE.md, "A busy machine").

libgomp reads ``GOMP_SPINCOUNT`` / ``OMP_WAIT_POLICY`` once, when it is loaded, so ``configure_wait`` must run before
the runtime is imported; settings the user made in the environment win.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import MutableMapping

SPIN_ENV = "GOMP_SPINCOUNT"
POLICY_ENV = "OMP_WAIT_POLICY"
DEFAULT_SPINCOUNT = 1000  # spin rounds before a waiting thread sleeps (libgomp's default: 300000)


@dataclass(frozen=True)
class WaitPolicy:
    """The barrier wait libgomp was given: ``setting`` (``GOMP_SPINCOUNT=1000``) and where it came from."""

    setting: str
    source: str  # "dllm default" | "environment" | "ignored: libgomp was loaded before dllm set it"

    def describe(self) -> str:
        return f"{self.setting} ({self.source})"


def _cpus() -> list[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return list(range(os.cpu_count() or 1))


def physical_cores(sysfs: Path = Path("/sys/devices/system/cpu")) -> int:
    """Physical cores among the CPUs this process may run on (SMT siblings count once); the logical CPU count
    where the topology is not readable."""
    cpus = _cpus()
    cores = set()
    for c in cpus:
        try:
            cores.add((sysfs / f"cpu{c}/topology/core_cpus_list").read_text().strip())
        except OSError:
            try:
                cores.add((sysfs / f"cpu{c}/topology/thread_siblings_list").read_text().strip())
            except OSError:
                return max(1, len(cpus))
    return max(1, len(cores))


def logical_cpus() -> int:
    return max(1, len(_cpus()))


def default_threads() -> int:
    """Threads when ``--threads`` is not given: one per physical core this process may use (an SMT sibling
    shares its core's vector units, and a thread per sibling doubles the barrier partners)."""
    return physical_cores()


def _gomp_loaded(maps: Path = Path("/proc/self/maps")) -> bool:
    try:
        return "libgomp" in maps.read_text()
    except OSError:
        return False


def configure_wait(environ: MutableMapping[str, str] | None = None, gomp_loaded: bool | None = None) -> WaitPolicy:
    """Give libgomp dllm's short spin unless the environment already chose (``GOMP_SPINCOUNT`` or
    ``OMP_WAIT_POLICY``). Call before the runtime library is loaded; if libgomp is already in the process (another
    library brought it), the setting cannot take effect and the policy says so."""
    env = os.environ if environ is None else environ
    loaded = _gomp_loaded() if gomp_loaded is None else gomp_loaded
    if SPIN_ENV in env or POLICY_ENV in env:
        shown = " ".join(f"{k}={env[k]}" for k in (POLICY_ENV, SPIN_ENV) if k in env)
        return WaitPolicy(shown, "environment")
    if loaded:
        return WaitPolicy("libgomp default (GOMP_SPINCOUNT=300000)", "ignored: libgomp was loaded before dllm set it")
    env[SPIN_ENV] = str(DEFAULT_SPINCOUNT)
    return WaitPolicy(f"{SPIN_ENV}={DEFAULT_SPINCOUNT}", "dllm default")


def describe(wait: WaitPolicy | None) -> dict[str, object]:
    """The threading choice for ``dllm runtime info`` and the bench header."""
    return {"default_threads": default_threads(), "physical_cores": physical_cores(), "logical_cpus": logical_cpus(),
            "wait": wait.describe() if wait else "unknown (no OpenMP runtime)"}
