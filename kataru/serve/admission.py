"""What is checked before a request reaches a route: the API key, the body's size, and the access log of the
routes that do not log themselves. Pure ASGI, so that a refused request is never read."""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable, Mapping
from typing import Any

from fastapi.responses import JSONResponse

from kataru.serve.protocol import APIError

log = logging.getLogger("kataru.serve")
PUBLIC = {"/health", "/", "/page/markdown-it.min.js", "/openapi.json"}  # the page and the schema hold no secrets


class Guard:
    """Pure ASGI middleware in front of every route: the API key, the body size limit (declared or streamed)
    and the access log of the routes that do not log themselves (generation logs its tokens when done)."""

    def __init__(self, app: Any, settings: Any) -> None:
        self.app, self.settings = app, settings

    async def __call__(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, path, status = time.monotonic(), scope["path"], [0]
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        settings = self.settings
        try:
            admit(path, headers, settings.api_keys, settings.max_body_bytes, settings.metrics_public)
        except APIError as err:
            await JSONResponse(err.body(), status_code=err.status, headers=err.headers)(scope, receive, send)
            status[0] = err.status
        else:
            received = [0]

            async def limited() -> dict[str, Any]:
                message = await receive()
                if message["type"] == "http.request":
                    received[0] += len(message.get("body", b""))
                    if received[0] > settings.max_body_bytes:
                        raise too_large(received[0], settings.max_body_bytes)
                return message

            async def sending(message: dict[str, Any]) -> None:
                if message["type"] == "http.response.start":
                    status[0] = message["status"]
                await send(message)

            await self.app(scope, limited, sending)
        if not path.startswith("/v1/") or status[0] != 200:
            log.info("%s %s %s %d %.3fs", headers.get("x-request-id", "-"), scope["method"], path, status[0],
                     time.monotonic() - started)


def admit(path: str, headers: Mapping[str, str], api_keys: list[str], max_body_bytes: int,
          metrics_public: bool) -> None:
    """What is checked before a request is read: the API key (on every route but the public ones) and the
    body size its headers declare. `headers` with lower-case names."""
    if api_keys and path not in PUBLIC and not (path == "/metrics" and metrics_public):
        authorize(headers.get("authorization"), api_keys)
    size = headers.get("content-length", "")
    if size.isdigit() and int(size) > max_body_bytes:
        raise too_large(int(size), max_body_bytes)


def too_large(size: int, limit: int) -> APIError:
    return APIError(413, f"the request body is {size} bytes or more, beyond this server's limit of {limit}",
                    code="request_too_large")


def authorize(header: str | None, keys: list[str]) -> None:
    """A bearer key equal to one of the keys, compared in constant time (every key, always)."""
    given = header[7:] if header and header.startswith("Bearer ") else ""
    matched = False
    for key in keys:
        matched |= secrets.compare_digest(given.encode(), key.encode())
    if not matched:
        raise APIError(401, "a valid API key is required: send Authorization: Bearer <key>",
                       type="authentication_error", code="invalid_api_key")
