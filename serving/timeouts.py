"""How long a request's work may run: until it finishes, its client leaves, or its deadline passes."""

from __future__ import annotations

import asyncio
import time
from typing import Awaitable, Callable

from serving.errors import timeout_error

DISCONNECT_POLL_SECONDS = 0.05


def deadline_after(timeout: float | None) -> float:
    """The monotonic time a request given `timeout` seconds must end by (never, without one)."""
    return time.monotonic() + timeout if timeout else float("inf")


async def finish_unless_abandoned(work: Awaitable[None], disconnected: Callable[[], Awaitable[bool]],
                                  timeout: float | None = None) -> None:
    """Await the work; cancel it if the client goes away first, or if it outlasts the timeout (408)."""
    task = asyncio.ensure_future(work)
    deadline = deadline_after(timeout)
    try:
        while not task.done():
            await asyncio.wait([task], timeout=DISCONNECT_POLL_SECONDS)
            if task.done():
                break
            if time.monotonic() > deadline:
                raise timeout_error(timeout)
            if await disconnected():
                task.cancel()
        await task
    finally:
        task.cancel()
