"""POST /v1/chat/completions and /v1/completions: validated, queued on the engine, then streamed as SSE
chunks or answered with one JSON object once every choice has finished."""

from __future__ import annotations

from typing import AsyncIterator, Awaitable, Callable

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel

from api.middleware import request_id
from api.sse import sse
from models import ChatCompletionRequest, CompletionRequest, SamplingRequest
from serving.chat import chat_chunks, chat_prompt, chat_response
from serving.completions import completion_chunks, completion_prompts, completion_response
from serving.text_service import Choice, Prompt, TextService


def text_router(ready: Callable[[], TextService]) -> APIRouter:
    router = APIRouter()

    @router.post("/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request, service: TextService = Depends(ready)):
        return await generate(service, body, request, f"chatcmpl-{request_id(request)}",
                              lambda: chat_prompt(service, body), body.n, chat_chunks, chat_response)

    @router.post("/completions")
    async def completions(body: CompletionRequest, request: Request, service: TextService = Depends(ready)):
        return await generate(service, body, request, f"cmpl-{request_id(request)}",
                              lambda: completion_prompts(service, body), body.candidates, completion_chunks,
                              completion_response)

    return router


async def generate(service: TextService, body: SamplingRequest, request: Request, rid: str,
                   prompts: Callable[[], Awaitable[list[Prompt]]], per_prompt: int,
                   chunks: Callable[..., AsyncIterator[BaseModel]],
                   response: Callable[..., BaseModel], typed_events: bool = False):
    """What the text endpoints do: check the model, queue `per_prompt` choices per prompt, then stream or wait."""
    service.check_model(body.model)
    grammar = await service.output_grammar(body)
    choices: list[Choice] = service.start(body, await prompts(), rid, per_prompt, grammar)
    if body.stream:
        return sse(chunks(service, body, choices, rid), rid, typed_events)
    await service.collect(choices, request.is_disconnected)
    return response(service, body, rid, choices)
