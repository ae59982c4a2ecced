"""POST /tokenize and /detokenize, vLLM's tokenizer endpoints (outside /v1, where vLLM has them)."""

from __future__ import annotations

from typing import Callable

from fastapi import APIRouter, Depends

from api.state import Service
from models import DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse
from serving.errors import APIError
from serving.text_service import TextService
from serving.tokenize import detokenize, tokenize
from serving.transcription import TranscriptionService


def tokenizer_router(ready: Callable[[], Service]) -> APIRouter:
    router = APIRouter()

    @router.post("/tokenize")
    async def tokenize_route(body: TokenizeRequest, service: Service = Depends(ready)) -> TokenizeResponse:
        return await tokenize(text_service(service), body)

    @router.post("/detokenize")
    async def detokenize_route(body: DetokenizeRequest, service: Service = Depends(ready)) -> DetokenizeResponse:
        return detokenize(text_service(service), body)

    return router


def text_service(service: Service) -> TextService:
    """A Whisper server has no text prompts to count: its prompts are audio, its tokenizer writes transcripts; an
    embedding server has no chat prompts."""
    if isinstance(service, TextService):
        return service
    serves = ("transcribes speech with Whisper (--serving-type whisper), whose prompts are audio"
              if isinstance(service, TranscriptionService) else "embeds text (--serving-type embedding)")
    raise APIError(404, f"/tokenize and /detokenize serve chat models; this server {serves}", type="not_found_error")
