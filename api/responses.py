"""POST /v1/responses (whole or as typed SSE events), GET and DELETE /v1/responses/{id}: the Responses
API on the chat path, with its stored responses."""

from __future__ import annotations

from typing import Callable

from fastapi import APIRouter, Depends, Request

from api.text import generate
from models import DeletedResponse, ResponseObject, ResponsesRequest, new_id
from serving.chat import chat_prompt
from serving.generator import Generator
from serving.responses import ResponsesService, ResponseStore


def responses_router(ready: Callable[[], Generator], store: ResponseStore) -> APIRouter:
    router = APIRouter()

    @router.post("/responses")
    async def create_response(body: ResponsesRequest, request: Request, generator: Generator = Depends(ready)):
        service = ResponsesService(generator, store)
        turn = service.prepare(body)
        return await generate(generator, turn.chat, request, new_id("resp").replace("-", "_"),
                              lambda: chat_prompt(generator, turn.chat), 1,
                              lambda _generator, _body, choices, rid: service.events(turn, choices, rid),
                              lambda _generator, _body, rid, choices: service.whole(turn, choices, rid),
                              typed_events=True)

    @router.get("/responses/{response_id}")
    async def get_response(response_id: str, _: Generator = Depends(ready)) -> ResponseObject:
        return store.get(response_id).response

    @router.delete("/responses/{response_id}")
    async def delete_response(response_id: str, _: Generator = Depends(ready)) -> DeletedResponse:
        store.delete(response_id)
        return DeletedResponse(id=response_id)

    return router
