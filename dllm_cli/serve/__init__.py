"""``dllm serve``: an OpenAI-compatible HTTP server over one loaded model, and a page that draws the diffusion.

Modules, from the socket inwards: ``connections`` (bind, connection limits and timeouts, half-closed clients,
repeated log lines collapsed), ``guard`` (Host header, API key, body size and time, before any route),
``validate`` (JSON -> strict typed body, valid Unicode, the server's ceilings, cheap size checks), ``schemas``
(request bodies), ``requests`` (bodies -> ``GenerationSpec``, response shapes), ``tools`` (LLaDA2 function
calling), ``completion`` (events -> final text, stop strings, usage), ``worker`` (queue slots, the preparation
thread, ``--parallel`` decoding slots fed by a FIFO queue, the model's thread pumping the batching scheduler,
the request timeout), ``backend`` (prompt preparation and the generation function the worker owns;
injectable), ``app`` (routes and errors), ``server`` (uvicorn), ``static/index.html`` (the live page).
"""
from __future__ import annotations

from dllm_cli.serve.app import ServeSettings, create_app
from dllm_cli.serve.backend import Backend, GenerationSpec, ModelBackend, ServerDefaults
from dllm_cli.serve.server import serve
from dllm_cli.serve.worker import Job, Worker

__all__ = ["Backend", "GenerationSpec", "Job", "ModelBackend", "ServeSettings", "ServerDefaults", "Worker",
           "create_app", "serve"]
