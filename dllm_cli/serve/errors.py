"""OpenAI-style API errors: ``{"error": {"message", "type", "param", "code"}}`` with an HTTP status.

Library errors (``DllmError``) are mapped here once, so a bad request never becomes a 500 with a traceback.
"""
from __future__ import annotations

from typing import Any

from dllm_cli.errors import ContextFullError, DllmError, UsageError


class ApiError(Exception):
    """An error answered to the client as OpenAI's error JSON."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def queue_full(limit: int) -> ApiError:
    return ApiError(429, f"the server is busy: {limit} requests are already waiting; retry later",
                    type="rate_limit_error", code="queue_full")


def from_library(err: BaseException) -> ApiError:
    """The API error for an exception raised while preparing or decoding a request."""
    if isinstance(err, ApiError):
        return err
    if isinstance(err, ContextFullError):
        return ApiError(400, str(err), param="messages", code="context_length_exceeded")
    if isinstance(err, UsageError):
        return ApiError(400, err.message, code="invalid_value")
    if isinstance(err, DllmError):
        return ApiError(500, str(err), type="server_error", code="model_error")
    return ApiError(500, f"internal error ({type(err).__name__}); the server log has the details",
                    type="server_error", code="internal_error")
