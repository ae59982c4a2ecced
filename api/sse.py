"""Server-sent events: each event a `data:` line of JSON, errors mid-stream in OpenAI's shape, then
`data: [DONE]` (or, for the Responses API's typed events, an `event:` line before each and no [DONE]);
generation stops the moment the client disconnects."""

from __future__ import annotations

import asyncio
import logging
from typing import AsyncIterator

from fastapi.responses import StreamingResponse
from pydantic import BaseModel
from starlette.types import Receive, Scope, Send

from models import ErrorBody, ErrorResponse
from serving.errors import APIError

logger = logging.getLogger("batchwise.api")


class EventStream(StreamingResponse):
    """SSE that stops the moment the client disconnects, whatever ASGI version the server speaks
    (from ASGI 2.4 Starlette only notices on the next failed send, which uvicorn never fails)."""

    def __init__(self, events: AsyncIterator[str]) -> None:
        super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.events = events

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        streaming = asyncio.create_task(self.stream_response(send))
        listening = asyncio.create_task(self.listen_for_disconnect(receive))
        try:
            await asyncio.wait([streaming, listening], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (streaming, listening):
                task.cancel()
            await asyncio.gather(streaming, listening, return_exceptions=True)
            await self.events.aclose()


def sse(events: AsyncIterator[BaseModel], rid: str, typed: bool = False) -> EventStream:
    async def lines() -> AsyncIterator[str]:
        try:
            async for event in events:
                name = f"event: {event.type}\n" if typed else ""
                yield f"{name}data: {event.model_dump_json(exclude_none=False)}\n\n"
        except APIError as error:
            logger.error("request %s failed mid-stream: %s", rid, error.message)
            body = ErrorResponse(error=ErrorBody(message=error.message, type=error.type, code=error.code))
            name = "event: error\n" if typed else ""
            yield f"{name}data: {body.model_dump_json()}\n\n"
        if not typed:
            yield "data: [DONE]\n\n"
    return EventStream(lines())
