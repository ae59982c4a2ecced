"""POST /v1/embeddings, OpenAI's, and /rerank, Jina's and Cohere's: served by an embedding model or cross-encoder
(--serving-type embedding) or a decoder chat model; other servers say why they cannot."""

from __future__ import annotations

from typing import Callable

from fastapi import APIRouter, Depends, Request

from api.middleware import request_id
from api.state import Service
from models import EmbeddingRequest, EmbeddingResponse, RerankRequest, RerankResponse
from serving.embeddings import EmbeddingService
from serving.errors import APIError
from serving.text_service import TextService
from serving.transcription import TranscriptionService


def embeddings_router(ready: Callable[[], Service]) -> APIRouter:
    router = APIRouter()

    @router.post("/embeddings")
    async def embeddings(body: EmbeddingRequest, request: Request,
                         service: Service = Depends(ready)) -> EmbeddingResponse:
        return await embedding_service(service, body.model).embed(body, request_id(request), request.is_disconnected)

    return router


def rerank_router(ready: Callable[[], Service]) -> APIRouter:
    """POST /rerank, mounted at the root and under /v1 as vLLM serves it."""
    router = APIRouter()

    @router.post("/rerank")
    async def rerank(body: RerankRequest, request: Request, service: Service = Depends(ready)) -> RerankResponse:
        return await embedding_service(service, body.model).rerank(body, request_id(request), request.is_disconnected)

    return router


def embedding_service(service: Service, model: str) -> EmbeddingService:
    """An embedding server's service, or a decoder chat model's embeddings."""
    if isinstance(service, EmbeddingService):
        return service
    if isinstance(service, TextService) and service.embeddings is not None:
        return service.embeddings
    service.check_model(model)
    serves = "transcribes speech" if isinstance(service, TranscriptionService) else "generates text (an " \
        "encoder-decoder model)"
    raise APIError(400, f"The model '{model}' cannot embed: it {serves} on this server. Serve an embedding model "
                        "with --serving-type embedding", param="model", code="model_not_embedding")
