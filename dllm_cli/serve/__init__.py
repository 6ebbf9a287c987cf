"""``dllm serve``: an OpenAI-compatible HTTP server over one loaded model, and a page that draws the diffusion.

Modules: ``schemas`` (request bodies), ``requests`` (bodies -> ``GenerationSpec``, response shapes), ``tools``
(LLaDA2 function calling), ``completion`` (events -> final text, stop strings, usage), ``worker`` (``--parallel``
slots and a FIFO queue; the model's thread pumps the batching scheduler), ``backend`` (the generation function
the worker owns; injectable), ``app`` (routes and errors), ``server`` (uvicorn), ``static/index.html`` (the live page).
"""
from __future__ import annotations

from dllm_cli.serve.app import ServeSettings, create_app
from dllm_cli.serve.backend import Backend, GenerationSpec, ModelBackend, ServerDefaults
from dllm_cli.serve.server import serve
from dllm_cli.serve.worker import Job, Worker

__all__ = ["Backend", "GenerationSpec", "Job", "ModelBackend", "ServeSettings", "ServerDefaults", "Worker",
           "create_app", "serve"]
