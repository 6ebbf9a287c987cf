"""The ASGI layers in front of every route, cheapest check first: the Host header, the API key, the body size.

``Guard`` answers before any route runs and before the body is read:

- **Host** (DNS rebinding): a web page on ``evil.example`` can point its name at 127.0.0.1 and then talk to a
  loopback server from the victim's browser, with its own name in the ``Host`` header. A loopback server therefore
  answers only requests whose Host is one of its own names (``localhost``, ``127.0.0.1``, ``[::1]``, the bound
  host, ``--allowed-host`` names); others get 403, as Ollama does. A server bound to another address checks Host
  only when ``--allowed-host`` names are given.
- **API key** on ``/v1/*``: 401 with ``WWW-Authenticate: Bearer`` before the body is parsed, so an unauthenticated
  client learns nothing about the API (not even that its JSON is malformed).
- **Body**: over ``max_body_bytes`` is 413; a body that does not arrive within ``body_timeout_s`` is 408.
"""
from __future__ import annotations

import asyncio
import hmac
from dataclasses import dataclass
from typing import Iterable

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dllm_cli.serve.errors import ApiError

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]")


def host_name(value: str) -> str:
    """``Host`` header value -> the bare name, lower case: ``"LocalHost.:8000"`` -> ``"localhost"``,
    ``"[::1]:80"`` -> ``"[::1]"``."""
    v = value.strip().lower()
    if v.startswith("["):
        end = v.find("]")
        return v[:end + 1] if end > 0 else v
    return v.rsplit(":", 1)[0].rstrip(".") if v.count(":") == 1 else v.rstrip(".")


def bracketed(host: str) -> str:
    """An address as a Host header writes it: IPv6 in brackets."""
    return f"[{host.strip('[]')}]" if ":" in host else host


@dataclass(frozen=True)
class GuardPolicy:
    """``allowed_hosts`` empty: any Host; ``api_key`` None: open."""

    allowed_hosts: frozenset[str] = frozenset()
    api_key: str | None = None
    max_body_bytes: int = 1 << 20
    body_timeout_s: float = 30.0

    @staticmethod
    def hosts_for(bound: str, loopback: bool, extra: Iterable[str]) -> frozenset[str]:
        """The Host names a server bound to ``bound`` answers to ('*' in ``extra``: any)."""
        extra = [host_name(h) for h in extra]
        if "*" in extra or (not loopback and not extra):
            return frozenset()
        names = set(extra) | {host_name(bracketed(bound))}
        if loopback:
            names |= set(LOOPBACK_HOSTS)
        return frozenset(names)


async def _answer(err: ApiError, scope: Scope, receive: Receive, send: Send) -> None:
    await JSONResponse(err.body(), status_code=err.status, headers=err.headers)(scope, receive, send)


class Guard:
    """ASGI middleware applying a ``GuardPolicy`` (see the module docstring)."""

    def __init__(self, app: ASGIApp, policy: GuardPolicy) -> None:
        self.app, self.policy = app, policy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        err = self._refusal(scope, headers)
        if err is not None:
            return await _answer(err, scope, receive, send)
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        declared = headers.get(b"content-length")
        limit = self.policy.max_body_bytes
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await _answer(_too_large(limit), scope, receive, send)
        try:
            body = await asyncio.wait_for(self._read(receive, limit), self.policy.body_timeout_s)
        except asyncio.TimeoutError:
            return await _answer(ApiError(408, f"the request body did not arrive within "
                                          f"{self.policy.body_timeout_s:g} s", code="request_timeout"),
                                 scope, receive, send)
        if body is None:
            return await _answer(_too_large(limit), scope, receive, send)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    def _refusal(self, scope: Scope, headers: dict[bytes, bytes]) -> ApiError | None:
        allowed = self.policy.allowed_hosts
        host = headers.get(b"host")
        if allowed and host is not None:
            name = host_name(host.decode("latin-1"))
            if name not in allowed:
                shown = ", ".join(sorted(allowed))
                return ApiError(403, f"Host {name!r} is not one of this server's names ({shown}); to serve it "
                                "under another name, start it with --allowed-host NAME", code="host_not_allowed")
        key = self.policy.api_key
        if key is not None and scope["path"].startswith("/v1/"):
            given = headers.get(b"authorization", b"").decode("latin-1")
            token = given[7:] if given.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(token.encode("utf-8", "replace"), key.encode()):
                return ApiError(401, "invalid API key: send it as 'Authorization: Bearer KEY'",
                                code="invalid_api_key", headers={"WWW-Authenticate": 'Bearer realm="dllm"'})
        return None

    @staticmethod
    async def _read(receive: Receive, limit: int) -> bytes | None:
        """The whole body, or None once it grows past ``limit``."""
        chunks, size = [], 0
        while True:
            msg = await receive()
            if msg["type"] != "http.request":
                break
            chunks.append(msg.get("body", b""))
            size += len(chunks[-1])
            if size > limit:
                return None
            if not msg.get("more_body"):
                break
        return b"".join(chunks)


def _too_large(limit: int) -> ApiError:
    return ApiError(413, f"the request body is larger than {limit} bytes", code="request_too_large")
