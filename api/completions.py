"""POST /v1/completions: streamed as text_completion events, or one text_completion."""

from __future__ import annotations

from typing import Callable

from fastapi import APIRouter, Depends, Request

from api.middleware import request_id
from api.sse import sse
from models import CompletionRequest
from serving.completions import completion_chunks, completion_prompts, completion_response
from serving.generator import Generator


def completions_router(ready: Callable[[], Generator]) -> APIRouter:
    router = APIRouter()

    @router.post("/completions")
    async def completions(body: CompletionRequest, request: Request,
                          generator: Generator = Depends(ready)):
        generator.check_model(body.model)
        rid = f"cmpl-{request_id(request)}"
        choices = generator.start(body, completion_prompts(generator, body), rid, body.candidates)
        if body.stream:
            return sse(completion_chunks(generator, body, choices, rid), rid)
        await generator.collect(choices, request.is_disconnected)
        return completion_response(generator, body, rid, choices)

    return router
