"""The FastAPI application: OpenAI-compatible routes, SSE streaming, OpenAI-style errors, the live page.

Every route only validates, queues a ``Job`` on the ``Worker`` and turns the job's events into responses; the
model lives on the worker thread. Whatever goes wrong, the client gets ``{"error": {...}}`` with a 4xx/5xx
status, never a traceback (the log on stderr has it).
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
from dataclasses import dataclass
from importlib import resources
from typing import Any, AsyncIterator, Callable

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from sse_starlette import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dllm_cli import __version__
from dllm_cli.decoding.events import BlockEvent
from dllm_cli.serve.completion import Tally, TextStream, conclude
from dllm_cli.serve.errors import ApiError, from_library
from dllm_cli.serve.requests import Shape, chat_spec, completion_spec
from dllm_cli.serve.schemas import ChatRequest, CompletionRequest
from dllm_cli.serve.worker import END, Item, Job, Worker

log = logging.getLogger("dllm.serve")
POLL_S = 0.25  # how often a waiting non-streaming request checks that its client is still there


@dataclass(frozen=True)
class ServeSettings:
    """Server policy: the API key (None = open), the request body limit."""

    api_key: str | None = None
    max_body_bytes: int = 1 << 20


class BodyLimit:
    """ASGI middleware: a request body over ``limit`` bytes is answered 413 before any route reads it."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._refuse(scope, receive, send)
        chunks, size = [], 0
        while True:
            msg = await receive()
            if msg["type"] != "http.request":
                break
            chunks.append(msg.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return await self._refuse(scope, receive, send)
            if not msg.get("more_body"):
                break
        body, replayed = b"".join(chunks), False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        err = ApiError(413, f"the request body is larger than {self.limit} bytes", code="request_too_large")
        await JSONResponse(err.body(), status_code=413)(scope, receive, send)


def _validation_error(exc: RequestValidationError) -> ApiError:
    first = exc.errors()[0] if exc.errors() else {}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "json_invalid":
        return ApiError(400, "the request body is not valid JSON", code="invalid_json")
    param = ".".join(loc) or None
    if param is None:
        return ApiError(400, "the request body must be a JSON object (Content-Type: application/json)",
                        code="invalid_json")
    if first.get("type") == "missing":
        return ApiError(400, f"missing required field {param!r}", param=param, code="missing_required_parameter")
    msg = first.get("msg", "invalid request")
    return ApiError(400, f"{param}: {msg}" if param else msg, param=param, code="invalid_value")


def _install_error_handlers(app: FastAPI) -> None:
    async def api_error(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        return JSONResponse(exc.body(), status_code=exc.status)

    async def validation(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        err = _validation_error(exc)
        return JSONResponse(err.body(), status_code=err.status)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        what = {404: "not found: the API is under /v1 (see GET /v1/models)",
                405: "method not allowed on this path"}.get(exc.status_code, str(exc.detail))
        err = ApiError(exc.status_code, f"{request.method} {request.url.path}: {what}",
                       code={404: "not_found", 405: "method_not_allowed"}.get(exc.status_code))
        return JSONResponse(err.body(), status_code=exc.status_code)

    async def unexpected(_: Request, exc: Exception) -> Response:
        log.error("unhandled error", exc_info=exc)
        err = from_library(exc)
        return JSONResponse(err.body(), status_code=err.status)

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(RequestValidationError, validation)
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
                raise ApiError(503, "the server is shutting down; this request was cancelled", type="server_error",
                               code="shutting_down")
            if request is not None and loop.time() >= self._check_at:
                self._check_at = loop.time() + POLL_S
                if await request.is_disconnected():
                    self.job.cancel()
                    raise asyncio.CancelledError("client disconnected")
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


async def _answer(worker: Worker, request: Request, body: Any, spec: Any, *, chat: bool, hold: bool) -> Response:
    """Queue the request; the whole JSON answer, or an SSE stream once the job has started."""
    stopping = request.app.state.stopping
    if stopping():
        raise ApiError(503, "the server is shutting down", type="server_error", code="shutting_down")
    job = Job(spec, asyncio.get_running_loop())
    worker.submit(job)
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
        raise from_library(first)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return EventSourceResponse(ex.events(first, include_usage), ping=15)


def _openai_routes(app: FastAPI, worker: Worker, settings: ServeSettings) -> None:
    async def authorize(request: Request) -> None:
        if settings.api_key is None:
            return
        given = request.headers.get("authorization", "")
        token = given[7:] if given.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(token.encode(), settings.api_key.encode()):
            raise ApiError(401, "invalid API key: send it as 'Authorization: Bearer KEY'", code="invalid_api_key")

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    async def chat_completions(body: ChatRequest, request: Request) -> Response:
        hold = bool(body.tools) and body.tool_choice != "none"  # a <tool_call> tail waits to be parsed
        return await _answer(worker, request, body, chat_spec(body), chat=True, hold=hold)

    @app.post("/v1/completions", dependencies=[Depends(authorize)])
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await _answer(worker, request, body, completion_spec(body), chat=False, hold=False)

    @app.get("/v1/models", dependencies=[Depends(authorize)])
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
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    _install_error_handlers(app)
    _openai_routes(app, worker, settings)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": worker.model_id, "queue": worker.status()}

    @app.get("/", response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        return HTMLResponse(resources.files("dllm_cli.serve").joinpath("static/index.html").read_text("utf-8"))

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon() -> Response:
        return Response(status_code=204)

    return app
