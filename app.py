"""FastAPI app factory: routes, errors in the OpenAI shape, SSE streaming, model start-up in the lifespan."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from typing import AsyncIterator, Callable

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Receive, Scope, Send

from config import Config
from model_manager import build_engine, load_model
from models import ChatCompletionRequest, CompletionRequest, ErrorBody, ErrorResponse, ModelCard, ModelList
from serving import (APIError, Generator, chat_chunks, chat_response, completion_chunks, completion_response)

__version__ = "0.1.0"

logger = logging.getLogger("batchwise.api")

ENDPOINTS = ["/v1/chat/completions", "/v1/completions", "/v1/models", "/health"]


class EventStream(StreamingResponse):
    """SSE that stops the moment the client disconnects, whatever ASGI version the server speaks
    (from ASGI 2.4 Starlette only notices on the next failed send, which uvicorn never fails)."""

    def __init__(self, events: AsyncIterator[str]) -> None:
        super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.events = events

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        streaming = asyncio.create_task(self.stream_response(send))
        listening = asyncio.create_task(self.listen_for_disconnect(receive))
        try:
            await asyncio.wait([streaming, listening], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (streaming, listening):
                task.cancel()
            await asyncio.gather(streaming, listening, return_exceptions=True)
            await self.events.aclose()


class RequestIdMiddleware:
    """Gives every request an id (the client's x-request-id, or a new one) for logs and the response."""

    def __init__(self, app: Callable) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        rid = headers.get(b"x-request-id", b"").decode("latin-1")[:128] or uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid

        async def send_with_id(message: dict) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode("latin-1"))]
            await send(message)

        await self.app(scope, receive, send_with_id)


def error_response(status: int, message: str, type: str, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    body = ErrorResponse(error=ErrorBody(message=message, type=type, param=param, code=code))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def request_id(request: Request) -> str:
    return getattr(request.state, "request_id", "-")


def validation_message(error: RequestValidationError) -> tuple[str, str | None]:
    first = error.errors()[0]
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    if first.get("type") == "json_invalid":
        return "The request body is not valid JSON.", None
    param = ".".join(location) or None
    return (f"Invalid value for '{param}': {first.get('msg')}" if param else f"Invalid request: {first.get('msg')}"), param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError) -> JSONResponse:
        log = logger.error if error.status >= 500 else logger.info
        log("request %s failed with %d: %s", request_id(request), error.status, error.message)
        return error_response(error.status, error.message, error.type, error.param, error.code, error.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
        message, param = validation_message(error)
        logger.info("request %s rejected: %s", request_id(request), message)
        return error_response(400, message, "invalid_request_error", param)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
        message = f"Unknown route {request.method} {request.url.path}" if error.status_code == 404 else str(error.detail)
        return error_response(error.status_code, message, kind)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception) -> JSONResponse:
        logger.exception("request %s failed unexpectedly", request_id(request), exc_info=error)
        return error_response(500, f"Internal server error (request id {request_id(request)})", "server_error")


def sse(events: AsyncIterator[BaseModel], rid: str) -> EventStream:
    async def lines() -> AsyncIterator[str]:
        try:
            async for event in events:
                yield f"data: {event.model_dump_json(exclude_none=False)}\n\n"
        except APIError as error:
            logger.error("request %s failed mid-stream: %s", rid, error.message)
            body = ErrorResponse(error=ErrorBody(message=error.message, type=error.type, code=error.code))
            yield f"data: {body.model_dump_json()}\n\n"
        yield "data: [DONE]\n\n"
    return EventStream(lines())


def create_app(config: Config) -> FastAPI:
    state: dict[str, Generator] = {}

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        starting = asyncio.create_task(start_engine())
        try:
            yield
        finally:
            starting.cancel()
            await asyncio.gather(starting, return_exceptions=True)
            if "generator" in state:
                await state["generator"].engine.stop()

    async def start_engine() -> None:
        try:
            loaded = await asyncio.to_thread(load_model, config)
        except Exception:
            logger.exception("could not load the model %s", config.hf_model)
            raise
        engine = build_engine(loaded, config)
        engine.start()
        state["generator"] = Generator(engine, loaded)
        logger.info("serving %s on http://%s:%d", loaded.name, config.host, config.port)

    def ready_generator() -> Generator:
        generator = state.get("generator")
        if generator is None or not generator.engine.alive:
            raise APIError(503, "the model is still loading", type="service_unavailable", headers={"Retry-After": "5"})
        return generator

    app = FastAPI(title="Batchwise", version=__version__, lifespan=lifespan)
    install_error_handlers(app)

    app.add_middleware(RequestIdMiddleware)

    @app.get("/")
    async def root() -> dict:
        generator = state.get("generator")
        return {"name": "Batchwise", "version": __version__, "model": generator.model_name if generator else None,
                "serving_type": config.serving_type, "endpoints": ENDPOINTS}

    @app.get("/health")
    async def health() -> JSONResponse:
        generator = state.get("generator")
        if generator is None or not generator.engine.alive:
            return JSONResponse({"status": "loading" if generator is None else "engine stopped"}, status_code=503)
        stats = generator.engine.stats()
        return JSONResponse({"status": "ok", "model": generator.model_name, "running": stats.running,
                             "waiting": stats.waiting, "steps": stats.steps})

    @app.get("/v1/models")
    async def list_models(generator: Generator = Depends(ready_generator)) -> ModelList:
        return ModelList(data=[ModelCard(id=generator.model_name)])

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str, generator: Generator = Depends(ready_generator)) -> ModelCard:
        generator.check_model(model_id)
        return ModelCard(id=model_id)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request,
                               generator: Generator = Depends(ready_generator)):
        generator.check_model(body.model)
        rid = f"chatcmpl-{request_id(request)}"
        choices = generator.start(body, [generator.chat_prompt(body)], rid)
        if body.stream:
            return sse(chat_chunks(generator, body, choices, rid), rid)
        await generator.collect(choices, request.is_disconnected)
        return chat_response(rid, generator.model_name, choices)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request, generator: Generator = Depends(ready_generator)):
        generator.check_model(body.model)
        rid = f"cmpl-{request_id(request)}"
        choices = generator.start(body, generator.completion_prompts(body), rid)
        if body.stream:
            return sse(completion_chunks(generator, body, choices, rid), rid)
        await generator.collect(choices, request.is_disconnected)
        return completion_response(rid, generator.model_name, choices)

    return app
