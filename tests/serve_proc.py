"""``python tests/serve_proc.py PORT [OPTIONS-JSON]``: ``dllm serve``'s ``serve()`` over a scripted backend, in its
own process, for tests that need the real process: logs on stderr, signals, a lowered open-file limit.

OPTIONS-JSON keys: ``nofile`` (RLIMIT_NOFILE set first), ``max_connections``, ``header_timeout_s``, ``queue_size``,
``blocks`` and ``delay`` (the scripted answer: that many ``"x "`` blocks, seconds per step), ``prepare_delay``.
"""
from __future__ import annotations

import json
import os
import resource
import sys

sys.path.insert(0, os.path.dirname(__file__))

from dllm_cli import signals  # noqa: E402
from dllm_cli.serve import ServeSettings  # noqa: E402
from dllm_cli.serve.connections import ConnectionLimits  # noqa: E402
from dllm_cli.serve.server import serve  # noqa: E402
from serve_fakes import ScriptedBackend  # noqa: E402


def main() -> None:
    port = int(sys.argv[1])
    opts = json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}
    signals.install()  # as the CLI: serve() raises the signals uvicorn caught once the model is closed
    if "nofile" in opts:
        resource.setrlimit(resource.RLIMIT_NOFILE, (opts["nofile"], opts["nofile"]))
    backend = ScriptedBackend(lambda spec: ["x "] * opts.get("blocks", 2), delay=opts.get("delay", 0.0),
                              prepare_delay=opts.get("prepare_delay", 0.0))
    limits = ConnectionLimits(max_connections=opts.get("max_connections", 256),
                              header_timeout_s=opts.get("header_timeout_s", 10.0))
    serve(lambda: backend, ServeSettings(), "127.0.0.1", port, queue_size=opts.get("queue_size", 16), limits=limits,
          on_ready=lambda worker, bound: print(f"ready on {bound}", file=sys.stderr, flush=True))


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(signals.exit_code())
