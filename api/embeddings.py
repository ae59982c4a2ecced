"""POST /v1/embeddings, OpenAI's: served by an embedding model (--serving-type embedding); other servers say why
they cannot."""

from __future__ import annotations

from typing import Callable

from fastapi import APIRouter, Depends, Request

from api.middleware import request_id
from api.state import Service
from models import EmbeddingRequest, EmbeddingResponse
from serving.embeddings import EmbeddingService
from serving.errors import APIError
from serving.transcription import TranscriptionService


def embeddings_router(ready: Callable[[], Service]) -> APIRouter:
    router = APIRouter()

    @router.post("/embeddings")
    async def embeddings(body: EmbeddingRequest, request: Request,
                         service: Service = Depends(ready)) -> EmbeddingResponse:
        return await embedding_service(service, body.model).embed(body, request_id(request), request.is_disconnected)

    return router


def embedding_service(service: Service, model: str) -> EmbeddingService:
    if isinstance(service, EmbeddingService):
        return service
    service.check_model(model)
    serves = "transcribes speech" if isinstance(service, TranscriptionService) else "generates text"
    raise APIError(400, f"The model '{model}' cannot embed: it {serves} on this server. Serve an embedding model "
                        "with --serving-type embedding", param="model", code="model_not_embedding")
