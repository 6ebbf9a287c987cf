"""OpenAI-style API errors: ``{"error": {"message", "type", "param", "code"}}`` with an HTTP status.

Library errors (``DllmError``) are mapped here once, so a bad request never becomes a 500 with a traceback, and a
library message that names a command-line flag (``--temperature``) names the request field instead.
"""
from __future__ import annotations

import re
from typing import Any

from dllm_cli.errors import ContextFullError, DllmError, UsageError

RETRY_AFTER_S = 1  # what a 429 asks the client to wait: the queue moves one request at a time

# command-line flags as library messages name them -> the request field that sets the same thing
FLAG_FIELDS = {"--max-tokens": "max_tokens", "--temperature": "temperature", "--top-p": "top_p", "--seed": "seed",
               "--top-k": "dllm.top_k", "--threshold": "dllm.threshold",
               "--editing-threshold": "dllm.editing_threshold", "--max-post-steps": "dllm.max_post_steps",
               "--block-length": "dllm.block_length", "--indel": "dllm.indel", "--no-edit": "dllm.editing=false",
               "--edit": "dllm.editing", "--mode": "dllm.mode"}
_FLAG = re.compile("|".join(re.escape(f) for f in sorted(FLAG_FIELDS, key=len, reverse=True)) + r"(?![\w-])")


class ApiError(Exception):
    """An error answered to the client as OpenAI's error JSON (``headers`` go on the response)."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        """The JSON body; client text quoted in the message or param is made encodable (lone surrogates escaped)."""
        return {"error": {"message": _encodable(self.message), "type": self.type,
                          "param": None if self.param is None else _encodable(self.param), "code": self.code}}


def _encodable(text: str) -> str:
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def bad_request(message: str, param: str | None = None, code: str | None = "invalid_value") -> ApiError:
    return ApiError(400, message, param=param, code=code)


def queue_full(limit: int) -> ApiError:
    return ApiError(429, f"the server is busy: {limit} requests are already waiting; retry later",
                    type="rate_limit_error", code="queue_full", headers={"Retry-After": str(RETRY_AFTER_S)})


def shutting_down(what: str = "the server is shutting down") -> ApiError:
    return ApiError(503, what, type="server_error", code="shutting_down")


def request_fields(message: str) -> tuple[str, str | None]:
    """``message`` with every command-line flag replaced by its request field, and the first such field."""
    found = [FLAG_FIELDS[m.group()].split("=")[0] for m in _FLAG.finditer(message)]
    text = _FLAG.sub(lambda m: f"'{FLAG_FIELDS[m.group()]}'", message)
    return text, (found[0] if found else None)


def from_library(err: BaseException, prompt_field: str = "messages") -> ApiError:
    """The API error for an exception raised while preparing or decoding a request."""
    if isinstance(err, ApiError):
        return err
    if isinstance(err, ContextFullError):
        return ApiError(400, str(err), param=prompt_field, code="context_length_exceeded")
    if isinstance(err, UsageError):
        text, param = request_fields(str(err))
        return ApiError(400, text, param=param, code="invalid_value")
    if isinstance(err, DllmError):
        return ApiError(500, str(err), type="server_error", code="model_error")
    return ApiError(500, f"internal error ({type(err).__name__}); the server log has the details",
                    type="server_error", code="internal_error")
