"""POST /v1/chat/completions: streamed as chat.completion.chunk events, or one chat.completion."""

from __future__ import annotations

from typing import Callable

from fastapi import APIRouter, Depends, Request

from api.middleware import request_id
from api.sse import sse
from models import ChatCompletionRequest
from serving.chat import chat_chunks, chat_prompt, chat_response
from serving.generator import Generator


def chat_router(ready: Callable[[], Generator]) -> APIRouter:
    router = APIRouter()

    @router.post("/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request,
                               generator: Generator = Depends(ready)):
        generator.check_model(body.model)
        rid = f"chatcmpl-{request_id(request)}"
        choices = generator.start(body, [(chat_prompt(generator, body), "")], rid, body.n)
        if body.stream:
            return sse(chat_chunks(generator, body, choices, rid), rid)
        await generator.collect(choices, request.is_disconnected)
        return chat_response(generator, body, rid, choices)

    return router
