"""Load test of ``dllm serve``: N clients on loopback, a fixed number of requests, nothing lost or mixed up.

Starts ``dllm serve MODEL`` on a free loopback port (or uses ``--url``), asks each prompt once alone to get its
reference answer (greedy decoding is deterministic), then sends ``--requests`` chat requests from ``--clients``
threads at once (every other one streaming). Every request must come back 200 with exactly its prompt's
reference answer and prompt token count. Prints one JSON document: requests/s, latency p50/p95/max, lost, mismatched, errors. Exits 1
when any request was lost, failed or answered with another prompt's answer. A benchmark, not a timed test.

Also reported: aggregate generated tokens/s, the server's peak resident memory (VmHWM, Linux) and, with
``--fairness``, the latency of a 3-token request sent while a ``--long-tokens`` request decodes, next to both
requests' latency alone (issue 26: no head-of-line blocking). ``--parallel`` is passed to ``dllm serve``.

Usage: python benchmarks/serve_load.py [--model GGUF] [--clients 4] [--requests 200] [--max-tokens 64]
                                       [--mode quality] [--threads N] [--distinct 12] [--url URL]
                                       [--parallel N] [--ctx-size N] [--fairness] [--long-tokens 1000]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

DLLM = str(Path(sys.executable).with_name("dllm"))
# Demo-model prompts with pairwise different answers, so a mixed-up reply is caught (docs/DEMO_MODEL.md).
# The first four also differ in prompt length, which the check includes (a random model answers them alike).
PROMPTS = ["Sort: 5 2 9", "Sort: 8 1 4 3 7", "What is the capital of France?", "Tell me about the banana.",
           "Reverse: a b c", "Reverse: x y z w", "What is the capital of Italy?", "What colour is the banana?",
           "What colour is the sky?", "Repeat: cat dog sun", "How many times does cat appear: cat cat?",
           "Describe the number 42."]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [DLLM, "serve", *([args.model] if args.model else []), "--host", "127.0.0.1", "--port", str(port),
           "--queue-size", str(max(16, 2 * args.clients)), "--max-tokens", str(max(args.max_tokens, args.long_tokens)),
           "--mode", args.mode, *(["--threads", str(args.threads)] if args.threads else []),
           *(["--parallel", str(args.parallel)] if args.parallel else []),
           *(["--ctx-size", str(args.ctx_size)] if args.ctx_size else [])]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while True:
        if proc.poll() is not None:
            sys.exit(f"dllm serve exited with {proc.returncode}: {' '.join(cmd)}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            sys.exit("dllm serve did not come up")
        time.sleep(0.2)


GENERATED: dict[int, int] = {}  # thread id -> completion tokens of its last answer


def chat(client: httpx.Client, url: str, prompt: str, stream: bool, max_tokens: int | None = None) -> tuple[int, object]:
    """(status, (answer text, prompt tokens)) of one chat request; a stream is joined from its deltas."""
    body = {"messages": [{"role": "user", "content": prompt}], "stream": stream,
            "stream_options": {"include_usage": True}, **({"max_tokens": max_tokens} if max_tokens else {})}
    if not stream:
        r = client.post(url + "/v1/chat/completions", json=body)
        if r.status_code != 200:
            return r.status_code, r.text
        doc = r.json()
        GENERATED[threading.get_ident()] = doc["usage"]["completion_tokens"]
        return 200, (doc["choices"][0]["message"]["content"], doc["usage"]["prompt_tokens"])
    parts, n_prompt = [], -1
    with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            return r.status_code, r.read().decode()
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    n_prompt = chunk["usage"]["prompt_tokens"]
                    GENERATED[threading.get_ident()] = chunk["usage"]["completion_tokens"]
                for choice in chunk["choices"]:
                    parts.append(choice["delta"].get("content") or "")
    return 200, ("".join(parts), n_prompt)


def load(url: str, expected: dict[str, object], n_requests: int, n_clients: int, max_tokens: int) -> dict:
    jobs: queue.Queue[int] = queue.Queue()
    for i in range(n_requests):
        jobs.put(i)
    results: dict[int, tuple[int, object, float]] = {}
    tokens: dict[int, int] = {}
    lock = threading.Lock()

    def client_loop() -> None:
        with httpx.Client(timeout=600) as client:
            while True:
                try:
                    i = jobs.get_nowait()
                except queue.Empty:
                    return
                t0 = time.perf_counter()
                try:
                    status, text = chat(client, url, PROMPTS[i % len(PROMPTS)], stream=bool(i % 2),
                                        max_tokens=max_tokens)
                except httpx.HTTPError as e:
                    status, text = -1, repr(e)
                with lock:
                    results[i] = (status, text, time.perf_counter() - t0)
                    tokens[i] = GENERATED.pop(threading.get_ident(), 0) if status == 200 else 0

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client_loop) for _ in range(n_clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = sorted(r[2] for r in results.values())
    ok = [i for i, r in results.items() if r[0] == 200]
    mixed = [i for i in ok if results[i][1] != expected[PROMPTS[i % len(PROMPTS)]]]
    q = statistics.quantiles(lat, n=20, method="inclusive") if len(lat) >= 2 else lat * 19
    return {"requests": n_requests, "clients": n_clients, "answered": len(ok), "lost": n_requests - len(results),
            "errors": len(results) - len(ok), "mismatched": len(mixed), "wall_s": round(wall, 3),
            "requests_per_s": round(len(ok) / wall, 2), "generated_tokens": sum(tokens.values()),
            "tokens_per_s": round(sum(tokens.values()) / wall, 2), "latency_s": {"p50": round(statistics.median(lat), 4),
                                                                      "p95": round(q[18], 4), "max": round(lat[-1], 4)}}


def fairness(url: str, long_tokens: int) -> dict:
    """Latency of a 3-token request alone, of a ``long_tokens`` request alone, then of the two together (the
    short one sent 1 s after the long one started)."""
    long_p, short_p = "Describe the number 42.", "What is 2 + 2?"
    out: dict[str, float] = {}

    def timed(key: str, prompt: str, n: int, delay: float = 0.0) -> None:
        time.sleep(delay)
        with httpx.Client(timeout=3600) as c:
            t0 = time.perf_counter()
            status, text = chat(c, url, prompt, stream=False, max_tokens=n)
            if status != 200:
                sys.exit(f"fairness request failed ({status}): {text}")
            out[key] = round(time.perf_counter() - t0, 3)

    timed("short_alone_s", short_p, 3)
    timed("long_alone_s", long_p, long_tokens)
    both = [threading.Thread(target=timed, args=("long_with_short_s", long_p, long_tokens)),
            threading.Thread(target=timed, args=("short_during_long_s", short_p, 3, 1.0))]
    for t in both:
        t.start()
    for t in both:
        t.join()
    return out


def peak_rss_mib(pid: int) -> float | None:
    """The process's peak resident memory (VmHWM) in MiB, None where /proc is not available."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="GGUF path or alias (default: the embedded demo model)")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--mode", default="quality")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--url", help="an already running server (its own options apply)")
    ap.add_argument("--distinct", type=int, default=len(PROMPTS), help="how many of the prompts to use")
    ap.add_argument("--parallel", type=int, help="dllm serve --parallel (requests decoded at once)")
    ap.add_argument("--ctx-size", type=int, help="dllm serve --ctx-size (per slot)")
    ap.add_argument("--fairness", action="store_true", help="also time a 3-token request during a long one")
    ap.add_argument("--long-tokens", type=int, default=1000, help="the long request's max_tokens (--fairness)")
    args = ap.parse_args()
    if not args.fairness:
        args.long_tokens = 0
    del PROMPTS[args.distinct:]
    load_before = os.getloadavg()[0]
    proc, url = (None, args.url) if args.url else start_server(args)
    try:
        with httpx.Client(timeout=600) as client:
            expected = {}
            for p in PROMPTS:
                status, text = chat(client, url, p, stream=False, max_tokens=args.max_tokens)
                if status != 200:
                    sys.exit(f"reference request failed ({status}): {text}")
                expected[p] = text
            model = client.get(url + "/health").json()["model"]
        result = load(url, expected, args.requests, args.clients, args.max_tokens)
        if args.fairness:
            result["fairness"] = fairness(url, args.long_tokens)
        if proc is not None:
            result["server_peak_rss_mib"] = peak_rss_mib(proc.pid)
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
    result.update(model=model, mode=args.mode, max_tokens=args.max_tokens, parallel=args.parallel,
                  distinct_prompts=len(PROMPTS),
                  distinct_answers=len({v[0] for v in expected.values()}),
                  distinct_references=len(set(expected.values())), threads=args.threads or os.cpu_count(),
                  machine=f"{platform.machine()} {platform.processor() or ''}".strip(),
                  server_rc=proc.returncode if proc is not None else None,
                  load_average={"start": round(load_before, 2), "end": round(os.getloadavg()[0], 2)})
    print(json.dumps(result))
    if result["lost"] or result["errors"] or result["mismatched"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
