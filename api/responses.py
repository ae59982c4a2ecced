"""POST /v1/responses (whole or as typed SSE events), GET and DELETE /v1/responses/{id}: the Responses
API on the chat path, with its stored responses."""

from __future__ import annotations

from typing import Callable

from fastapi import APIRouter, Depends, Request

from api.text import generate
from models import DeletedResponse, ResponseObject, ResponsesRequest, new_id
from serving.chat import chat_prompt
from serving.responses import ResponsesService, ResponseStore
from serving.text_service import TextService


def responses_router(ready: Callable[[], TextService], store: ResponseStore) -> APIRouter:
    router = APIRouter()

    @router.post("/responses")
    async def create_response(body: ResponsesRequest, request: Request, service: TextService = Depends(ready)):
        responses = ResponsesService(service, store)
        turn = responses.prepare(body)
        return await generate(service, turn.chat, request, new_id("resp").replace("-", "_"),
                              lambda: chat_prompt(service, turn.chat), 1,
                              lambda _service, _body, choices, rid: responses.events(turn, choices, rid),
                              lambda _service, _body, rid, choices: responses.whole(turn, choices, rid),
                              typed_events=True)

    @router.get("/responses/{response_id}")
    async def get_response(response_id: str, _: TextService = Depends(ready)) -> ResponseObject:
        return store.get(response_id).response

    @router.delete("/responses/{response_id}")
    async def delete_response(response_id: str, _: TextService = Depends(ready)) -> DeletedResponse:
        store.delete(response_id)
        return DeletedResponse(id=response_id)

    return router
