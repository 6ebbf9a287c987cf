"""The FastAPI application: OpenAI-compatible routes, SSE streaming, OpenAI-style errors, the live page.

Every route only validates, queues a ``Job`` on the ``Worker`` and turns the job's events into responses; the
model lives on the worker thread. Whatever goes wrong, the client gets ``{"error": {...}}`` with a 4xx/5xx
status, never a traceback (the log on stderr has it).
"""
from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from importlib import resources
from typing import Any, AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from sse_starlette import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from dllm_cli import __version__
from dllm_cli.decoding.events import BlockEvent
from dllm_cli.serve.backend import GenerationSpec
from dllm_cli.serve.completion import Tally, TextStream, conclude
from dllm_cli.serve.errors import ApiError, from_library, shutting_down
from dllm_cli.serve.guard import LOOPBACK_HOSTS, Guard, GuardPolicy
from dllm_cli.serve.requests import Shape, chat_spec, completion_spec
from dllm_cli.serve.schemas import ChatRequest, CompletionRequest, _Sampling
from dllm_cli.serve.validate import Ceilings, check_limits, parse_body
from dllm_cli.serve.worker import END, Item, Job, Worker

log = logging.getLogger("dllm.serve")
POLL_S = 0.25  # how often a waiting non-streaming request checks that its client is still there


@dataclass(frozen=True)
class ServeSettings:
    """Server policy: the API key (None = open), the body limit, the per-request ceilings, the Host names answered
    (empty = any; the default suits a loopback server; see ``guard.GuardPolicy.hosts_for``)."""

    api_key: str | None = None
    max_body_bytes: int = 1 << 20
    ceilings: Ceilings = Ceilings()
    allowed_hosts: frozenset[str] = frozenset(LOOPBACK_HOSTS)
    body_timeout_s: float = 30.0


class ClientGone(Exception):
    """The client closed its connection while its request waited or ran; nobody is left to answer."""


def _install_error_handlers(app: FastAPI) -> None:
    async def api_error(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    async def client_gone(request: Request, _: Exception) -> Response:
        log.info("%s %s: the client went away; its request was cancelled", request.method, request.url.path)
        return Response(status_code=499)  # never sent: the connection is closed

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        what = {404: "not found: the API is under /v1 (see GET /v1/models)",
                405: "method not allowed on this path"}.get(exc.status_code, str(exc.detail))
        err = ApiError(exc.status_code, f"{request.method} {request.url.path}: {what}",
                       code={404: "not_found", 405: "method_not_allowed"}.get(exc.status_code))
        return JSONResponse(err.body(), status_code=exc.status_code, headers=exc.headers)  # 405: Allow

    async def unexpected(_: Request, exc: Exception) -> Response:
        log.error("unhandled error", exc_info=exc)
        err = from_library(exc)
        return JSONResponse(err.body(), status_code=err.status)

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(ClientGone, client_gone)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, unexpected)


def _sse(obj: Any, event: str | None = None) -> dict[str, Any]:
    data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)
    return {"data": data, "event": event} if event else {"data": data}


class Exchange:
    """One request's life after validation: queued, then events folded into a response or an SSE stream."""

    def __init__(self, worker: Worker, job: Job, shape: Shape, stop: list[str], hold_tool_calls: bool,
                 stopping: Callable[[], bool]) -> None:
        self.worker, self.job, self.shape, self.stopping = worker, job, shape, stopping
        self.stream = TextStream(stop, hold_tool_calls=hold_tool_calls)
        self.tally = Tally()
        self.tally.constrained = getattr(job.spec.constraint, "kind", None)
        self._check_at = 0.0  # loop time of the next client-disconnect check

    async def next(self, request: Request | None) -> Item:
        """The job's next item. Cancels the job and raises ``CancelledError`` when the client has gone (checked
        every ``POLL_S`` whether or not items arrive), or ``ApiError`` 503 when the server is shutting down.
        """
        loop = asyncio.get_running_loop()
        while True:
            if self.stopping():
                self.job.cancel()
                raise shutting_down("the server is shutting down; this request was cancelled")
            if request is not None and loop.time() >= self._check_at:
                self._check_at = loop.time() + POLL_S
                if await request.is_disconnected():
                    self.job.cancel()
                    raise ClientGone()
            try:
                return await asyncio.wait_for(self.job.items.get(), POLL_S)
            except asyncio.TimeoutError:
                continue

    def fold(self, item: Item) -> str:
        """Fold one ``(event, view)`` item; return the text it makes final (stop strings handled)."""
        assert isinstance(item, tuple)
        ev, _view = item
        self.tally.update(ev)
        if not isinstance(ev, BlockEvent):
            return ""
        delta = self.stream.feed(ev.text)
        if self.stream.stopped:
            self.job.cancel()  # the rest would be thrown away: free the model at the next step
        return delta

    async def respond(self, request: Request) -> dict[str, Any]:
        """Run to the end and build the non-streaming body."""
        try:
            while (item := await self.next(request)) is not END:
                if isinstance(item, BaseException):
                    raise from_library(item)
                self.fold(item)
        finally:
            self.job.cancel()
        outcome, _ = conclude(self.stream, self.tally)
        return self.shape.response(outcome, self.tally.usage())

    async def events(self, first: Item, include_usage: bool) -> AsyncIterator[dict[str, Any]]:
        """SSE items: block-final text deltas (and step views when asked), finish, usage, ``[DONE]``."""
        item, shape = first, self.shape
        try:
            if shape.chat:
                yield _sse(shape.chunk(role=True))
            while item is not END:
                if isinstance(item, BaseException):
                    yield _sse(from_library(item).body())
                    yield _sse("[DONE]")
                    return
                delta = self.fold(item)
                ev, view = item
                if view is not None and not self.stream.stopped:
                    yield _sse(view, "dllm.step")
                elif self.job.spec.events and isinstance(ev, BlockEvent):
                    yield _sse({"block": ev.block}, "dllm.block")
                if delta:
                    yield _sse(shape.chunk(text=delta))
                try:
                    item = await self.next(None)  # sse-starlette watches the client itself
                except ApiError as e:  # shutting down: end the stream cleanly instead of cutting it
                    item = e
            outcome, rest = conclude(self.stream, self.tally)
            if rest:
                yield _sse(shape.chunk(text=rest))
            if outcome.tool_calls:
                yield _sse(shape.chunk(tool_calls=outcome.tool_calls))
            yield _sse(shape.chunk(finish=outcome.finish_reason))
            if include_usage:
                yield _sse(shape.usage_chunk(self.tally.usage()))
            yield _sse("[DONE]")
        finally:
            self.job.cancel()  # a client gone mid-stream lands here: the worker stops at the next step


async def _prepare(worker: Worker, job: Job, request: Request, stopping: Callable[[], bool]) -> None:
    """``worker.prepare(job)``, watching the client meanwhile: one that leaves stops the preparation
    (``ClientGone``)."""
    task = asyncio.ensure_future(worker.prepare(job, stopping))
    try:
        while not (await asyncio.wait({task}, timeout=POLL_S))[0]:
            if await request.is_disconnected():
                job.cancel()
                raise ClientGone()
    finally:
        if not task.done():
            task.cancel()
    task.result()


async def _answer(worker: Worker, request: Request, body: _Sampling, spec: GenerationSpec, *, chat: bool,
                  hold: bool) -> Response:
    """Take a queue slot, prepare off the model's thread, queue; the whole JSON answer, or an SSE stream once the
    job has started."""
    stopping = request.app.state.stopping
    if stopping():
        raise shutting_down()
    prompt_field = "messages" if chat else "prompt"
    job = Job(spec, asyncio.get_running_loop())
    worker.reserve(job)
    try:
        await _prepare(worker, job, request, stopping)
        worker.submit(job)
    except (ClientGone, ApiError):
        job.cancel()
        raise
    except Exception as e:
        job.cancel()
        raise from_library(e, prompt_field) from None
    except BaseException:
        job.cancel()
        raise
    ex = Exchange(worker, job, Shape(chat, worker.model_id), body.stop_list(), hold, stopping)
    if not body.stream:
        return JSONResponse(await ex.respond(request))
    try:
        first = await ex.next(request)  # the job has started: a bad prompt is still a plain 4xx here
    except BaseException:
        job.cancel()
        raise
    if isinstance(first, BaseException):
        job.cancel()
        raise from_library(first, prompt_field)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return EventSourceResponse(ex.events(first, include_usage), ping=15)


def _openai_routes(app: FastAPI, worker: Worker, settings: ServeSettings) -> None:
    """The OpenAI routes; ``Guard`` checked the Host and the API key before the body was read."""
    ceilings = settings.ceilings

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body = parse_body(await request.body(), ChatRequest)
        check_limits(body, ceilings, worker.context)
        hold = bool(body.tools) and body.tool_choice != "none"  # a <tool_call> tail waits to be parsed
        return await _answer(worker, request, body, chat_spec(body), chat=True, hold=hold)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = parse_body(await request.body(), CompletionRequest)
        check_limits(body, ceilings, worker.context)
        return await _answer(worker, request, body, completion_spec(body), chat=False, hold=False)

    @app.api_route("/v1/models", methods=["GET", "HEAD"])
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": worker.model_id, "object": "model", "created": 0,
                                            "owned_by": "dllm"}]}


def create_app(worker: Worker, settings: ServeSettings | None = None, *,
               stopping: Callable[[], bool] = lambda: False) -> FastAPI:
    """The ASGI app over a started ``Worker``: the OpenAI routes, ``/health`` and the page at ``/``.

    ``stopping()`` turns true when the server is shutting down: requests in flight are then cancelled at their
    next step and answered 503 (a stream ends with an error event and ``[DONE]``), so none is cut mid-write.
    """
    settings = settings or ServeSettings()
    app = FastAPI(title="dllm", version=__version__, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.stopping = stopping
    app.add_middleware(Guard, policy=GuardPolicy(settings.allowed_hosts, settings.api_key, settings.max_body_bytes,
                                                 settings.body_timeout_s))
    _install_error_handlers(app)
    _openai_routes(app, worker, settings)

    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": worker.model_id, "queue": worker.status()}

    @app.api_route("/", methods=["GET", "HEAD"], response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        return HTMLResponse(resources.files("dllm_cli.serve").joinpath("static/index.html").read_text("utf-8"))

    @app.api_route("/favicon.ico", methods=["GET", "HEAD"], include_in_schema=False)
    async def favicon() -> Response:
        return Response(status_code=204)

    return app
