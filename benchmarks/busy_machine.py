"""Step time on a busy machine (issue 28, part 3): fixed competing loads x thread counts x thread-wait policies.

Usage: .venv/bin/python benchmarks/busy_machine.py MODEL.gguf [--reps 5] [--threads 1,2,auto]
           [--loads none,nice0,mt19,loop19] [--waits default,...] [--rounds 2] [--prefix 256]

Loads (started before a measurement, stopped after it; in this process's session, so their nice value counts
against ours even with the kernel's autogroup scheduling):
    none     nothing
    nice0    one busy process per core at nice 0 (a build, a browser tab)
    mt19     one nice-19 process with 2 x cores busy threads (a parallel test job)
    loop19   one nice-19 busy process per core

Each measurement is a fresh child process (``--child``), because a wait setting must be in the environment
before libgomp loads: it loads the model, commits a random prefix, runs one warm-up
step and ``--reps`` 32-token steps (all rows out, confidence head), and prints the median. Rounds interleave every
configuration, so a change in the machine's other load hits all of them alike. Also prints the load average.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SPIN_C = r"""
#include <pthread.h>
#include <stdlib.h>
static void *spin(void *arg) { volatile unsigned long x = 0; (void)arg; for (;;) x++; return 0; }
int main(int argc, char **argv) {
    int n = argc > 1 ? atoi(argv[1]) : 1;
    pthread_t t;
    for (int i = 1; i < n; i++) pthread_create(&t, 0, spin, 0);
    spin(0);
}
"""


def spinner(workdir: Path) -> Path:
    """A C busy loop with N threads (``spin N``); compiled once into ``workdir``."""
    exe = workdir / "spin"
    if not exe.exists():
        src = workdir / "spin.c"
        src.write_text(SPIN_C)
        subprocess.run(["cc", "-O1", "-pthread", "-o", str(exe), str(src)], check=True)
    return exe


def start_load(kind: str, exe: Path) -> list[subprocess.Popen]:
    n = os.cpu_count() or 1
    cmds = {"none": [], "nice0": [["nice", "-n", "0", str(exe), "1"]] * n,
            "mt19": [["nice", "-n", "19", str(exe), str(2 * n)]],
            "loop19": [["nice", "-n", "19", str(exe), "1"]] * n}[kind]
    procs = [subprocess.Popen(c) for c in cmds]
    time.sleep(0.5 if procs else 0)
    return procs


def stop_load(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.kill()
    for p in procs:
        p.wait()


def child(args: argparse.Namespace) -> None:
    import numpy as np

    from dllm_cli.runtime.model import Model
    from dllm_cli.runtime.options import RuntimeOptions
    from dllm_cli.runtime.session import Session

    threads = None if args.child_threads == "auto" else int(args.child_threads)
    opts = RuntimeOptions(threads=threads, ctx_size=args.prefix + 64)
    model = Model(args.model, opts)
    s = Session(model, opts)
    rng = np.random.default_rng(0)
    B = model.block_length
    s.commit([int(t) for t in rng.integers(0, model.mask_id, size=args.prefix)], 0)
    block = [int(t) for t in rng.integers(0, model.mask_id, size=B // 2)] + [model.mask_id] * (B - B // 2)
    times = []
    for r in range(args.reps + 1):
        t0 = time.perf_counter()
        s.step(block, args.prefix, list(range(B)))
        if r:
            times.append(1e3 * (time.perf_counter() - t0))
    print(json.dumps({"median_ms": statistics.median(times), "ms": times, "n_threads": opts.n_threads}))


def measure(args: argparse.Namespace, threads: str, wait: str) -> dict:
    env = dict(os.environ)
    cmd = [sys.executable, __file__, str(args.model), "--child", "--child-threads", threads,
           "--reps", str(args.reps), "--prefix", str(args.prefix)]
    for setting in wait.split("+") if wait != "env" else []:  # environment settings, e.g. GOMP_SPINCOUNT=1000
        k, v = setting.split("=", 1)
        env[k] = v
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    if out.returncode:
        raise SystemExit(f"child failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", type=Path)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--prefix", type=int, default=256)
    ap.add_argument("--threads", default="1,2,auto")
    ap.add_argument("--loads", default="none,nice0,mt19,loop19")
    ap.add_argument("--waits", default="env", help="comma-separated thread-wait settings, each 'env' (as the "
                    "environment is) or ENV=VALUE[+ENV=VALUE] (GOMP_SPINCOUNT=1000, OMP_WAIT_POLICY=passive)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--child-threads", default="auto", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    results: dict[tuple[str, str, str], list[float]] = {}
    with tempfile.TemporaryDirectory() as d:
        exe = spinner(Path(d))
        for rnd in range(args.rounds):
            for load in args.loads.split(","):
                for wait in args.waits.split(","):
                    for t in args.threads.split(","):
                        procs = start_load(load, exe)
                        try:
                            r = measure(args, t, wait)
                        finally:
                            stop_load(procs)
                        la = os.getloadavg()[0]
                        results.setdefault((load, wait, t), []).append(r["median_ms"])
                        print(f"round {rnd} load {load:6s} wait {wait:24s} threads {t:4s} ({r['n_threads']}): "
                              f"{r['median_ms']:8.1f} ms  (loadavg {la:.1f})", flush=True)
    print("\n| load | wait | threads | step ms (median of rounds) | x idle (same wait, threads) |")
    print("|---|---|---|---|---|")
    for (load, wait, t), v in results.items():
        idle = results.get(("none", wait, t))
        ratio = f"{statistics.median(v) / statistics.median(idle):.2f}" if idle else "-"
        print(f"| {load} | {wait} | {t} | {statistics.median(v):.1f} | {ratio} |")


if __name__ == "__main__":
    main()
