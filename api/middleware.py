"""Request ids: every request gets one (the client's x-request-id, or a new one) for the logs and the
response headers; and every request is counted by route and status for /metrics."""

from __future__ import annotations

import re
import uuid
from typing import Callable

from fastapi import Request
from starlette.types import Receive, Scope, Send

from serving.metrics import Metrics


class RequestIdMiddleware:
    def __init__(self, app: Callable) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        rid = headers.get(b"x-request-id", b"").decode("latin-1")[:128] or uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid

        async def send_with_id(message: dict) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode("latin-1"))]
            await send(message)

        await self.app(scope, receive, send_with_id)


class RequestCountMiddleware:
    def __init__(self, app: Callable, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500

        async def send_with_status(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            self.metrics.request(route_template(scope), status)


def route_template(scope: Scope) -> str:
    """The matched route's path with its parameters as placeholders (ids in paths must not multiply labels);
    an included router's route knows only its own part of the path, so the rest is taken from the request."""
    route = scope.get("route")
    if route is None:
        return "unmatched"
    params = scope.get("path_params", {})
    filled = re.sub(r"{(\w+)(?::\w+)?}", lambda match: str(params.get(match[1], match[0])), route.path)
    path = scope["path"]
    return (path[:len(path) - len(filled)] if path.endswith(filled) else "") + route.path


def request_id(request: Request) -> str:
    return getattr(request.state, "request_id", "-")
