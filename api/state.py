"""What every route shares: the service once the model is up (chat or speech), and whether the server
is draining."""

from __future__ import annotations

import asyncio
import time

from serving.errors import APIError
from serving.generator import Generator
from serving.transcription import TranscriptionService

Service = Generator | TranscriptionService


class ServerState:
    def __init__(self) -> None:
        self.service: Service | None = None
        self.draining = False

    def ready(self) -> Service:
        """A FastAPI dependency: the service, or a 503 while the model loads or the server drains."""
        if self.draining:
            raise APIError(503, "the server is shutting down", type="service_unavailable")
        if self.service is None or not self.service.engine.alive:
            raise APIError(503, "the model is still loading", type="service_unavailable", headers={"Retry-After": "5"})
        return self.service

    async def drain(self, grace_seconds: float) -> None:
        """Refuse new work, then wait (at most grace_seconds) for running requests to finish."""
        self.draining = True
        deadline = time.monotonic() + grace_seconds
        while self.service and not self.service.engine.scheduler.idle and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
