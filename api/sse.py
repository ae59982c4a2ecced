"""Server-sent events: each event a `data:` line of JSON, errors mid-stream in OpenAI's shape, then
`data: [DONE]` (or, for the Responses API's typed events, an `event:` line before each and no [DONE]);
a comment line whenever the stream is silent a while; generation stops the moment the client disconnects."""

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

# proxies cut a connection idle for tens of seconds, and a long prompt's prefill on a CPU can take that long
KEEPALIVE_SECONDS = 5.0
KEEPALIVE = ": keep-alive\n\n"


class EventStream(StreamingResponse):
    """SSE that stops the moment the client disconnects, whatever ASGI version the server speaks
    (from ASGI 2.4 Starlette only notices on the next failed send, which uvicorn never fails)."""

    def __init__(self, events: AsyncIterator[str]) -> None:
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})  # nginx: pass at once
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


async def with_keepalive(lines: AsyncIterator[str], interval: float) -> AsyncIterator[str]:
    """`lines`, with a comment (which SSE clients skip) after every `interval` seconds without one. A pump task
    reads `lines` into a one-line queue, so waiting on the queue can time out without disturbing the source (a
    task per line cost ~25 us a line; this costs a few)."""
    queue: asyncio.Queue[str | Exception | None] = asyncio.Queue(maxsize=1)

    async def pump() -> None:
        try:
            async for line in lines:
                await queue.put(line)
            await queue.put(None)
        except Exception as error:  # raised where the consumer reads it, as without the pump
            await queue.put(error)

    pumping = asyncio.create_task(pump())
    try:
        while True:
            try:
                async with asyncio.timeout(interval):
                    item = await queue.get()
            except TimeoutError:
                yield KEEPALIVE
                continue
            if item is None:
                return
            if isinstance(item, Exception):
                raise item
            yield item
    finally:
        pumping.cancel()
        await asyncio.gather(pumping, return_exceptions=True)
        await lines.aclose()


def sse(events: AsyncIterator[BaseModel], rid: str, typed: bool = False,
        keepalive: float = KEEPALIVE_SECONDS) -> EventStream:
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
    return EventStream(with_keepalive(lines(), keepalive))
