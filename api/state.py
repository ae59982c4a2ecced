"""What every route shares: the service once the model is up (chat, speech or embeddings), how far start-up has got,
and whether the server is draining."""

from __future__ import annotations

import asyncio
import time

from serving.embeddings import EmbeddingService
from serving.errors import APIError
from serving.startup import StartupProgress
from serving.text_service import TextService
from serving.transcription import TranscriptionService

Service = TextService | TranscriptionService | EmbeddingService


class ServerState:
    def __init__(self) -> None:
        self.service: Service | None = None
        self.draining = False
        self.progress = StartupProgress()

    def health(self) -> tuple[int, dict]:
        """/health's status code and body: ok with the engine's counts, or why there is no serving now."""
        service = self.service
        if self.draining:
            return 503, {"status": "draining"}
        if service is None:
            return 503, {"status": "loading", **self.progress.report()}
        if not service.engine.alive:
            return 503, {"status": "error", "error": service.engine.fault or "the engine stopped"}
        stats = service.engine.stats()
        body = {"status": "ok", "model": service.model_name, "running": stats.running, "waiting": stats.waiting,
                "steps": stats.steps}
        background = service.background_compile if isinstance(service, TextService) else None
        compiling = background.progress() if background else None
        return 200, body | ({"compiling_decode_step": compiling} if compiling else {})

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
