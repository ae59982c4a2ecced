"""Request ids: every request gets one (the client's x-request-id, or a new one) for the logs and the
response headers."""

from __future__ import annotations

import uuid
from typing import Callable

from fastapi import Request
from starlette.types import Receive, Scope, Send


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


def request_id(request: Request) -> str:
    return getattr(request.state, "request_id", "-")
