"""FastAPI app factory: routes, errors in the OpenAI shape, SSE streaming, model start-up in the lifespan."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
import uuid
from typing import AsyncIterator, Callable

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Receive, Scope, Send

from audio_api import WHISPER_ENDPOINTS, audio_router
from config import Config
from models import ChatCompletionRequest, CompletionRequest, ErrorBody, ErrorResponse, ModelCard, ModelList
from serving import (APIError, Generator, chat_chunks, chat_response, completion_chunks, completion_response,
                     start_chat_service)
from transcription import start_transcription_service

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
    message = str(first.get("msg", "")).removeprefix("Value error, ")
    return (f"Invalid value for '{param}': {message}" if param else f"Invalid request: {message}"), param


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
        if error.status_code == 404:
            return error_response(404, f"Unknown route {request.method} {request.url.path}", "not_found_error")
        return error_response(error.status_code, str(error.detail), "invalid_request_error")

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


class ServerState:
    """What the routes share: the generator once the model is up, and whether we are draining."""

    def __init__(self) -> None:
        self.generator: Generator | None = None
        self.draining = False

    def ready(self) -> Generator:
        if self.draining:
            raise APIError(503, "the server is shutting down", type="service_unavailable")
        if self.generator is None or not self.generator.engine.alive:
            raise APIError(503, "the model is still loading", type="service_unavailable", headers={"Retry-After": "5"})
        return self.generator

    async def drain(self, grace_seconds: float) -> None:
        """Refuse new work, then wait (at most grace_seconds) for running requests to finish."""
        self.draining = True
        deadline = time.monotonic() + grace_seconds
        while self.generator and not self.generator.engine.scheduler.idle and time.monotonic() < deadline:
            await asyncio.sleep(0.05)


def api_key_checker(keys: list[str]) -> Callable[[Request], None]:
    encoded = [key.encode() for key in keys]

    def require_api_key(request: Request) -> None:
        if not encoded:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        given = token.strip().encode()
        # compare against every key, so the time taken does not tell which (or how much) matched
        matched = [hmac.compare_digest(given, key) for key in encoded]
        if scheme.lower() != "bearer" or not any(matched):
            raise APIError(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'.",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
    return require_api_key


def create_app(config: Config) -> FastAPI:
    state = ServerState()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        starting = asyncio.create_task(start_engine())
        try:
            yield
        finally:
            starting.cancel()
            await asyncio.gather(starting, return_exceptions=True)
            if state.generator:
                await state.generator.engine.stop()

    async def start_engine() -> None:
        start = start_transcription_service if config.serving_type == "whisper" else start_chat_service
        state.generator = await start(config)

    app = FastAPI(title="Batchwise", version=__version__, lifespan=lifespan)
    app.state.server = state
    install_error_handlers(app)
    app.add_middleware(RequestIdMiddleware)
    if config.origins:
        app.add_middleware(CORSMiddleware, allow_origins=config.origins, allow_methods=["*"], allow_headers=["*"])
    api = APIRouter(prefix="/v1", dependencies=[Depends(api_key_checker(config.api_keys()))])

    @app.get("/")
    async def root() -> dict:
        generator = state.generator
        endpoints = WHISPER_ENDPOINTS if config.serving_type == "whisper" else ENDPOINTS
        return {"name": "Batchwise", "version": __version__, "model": generator.model_name if generator else None,
                "serving_type": config.serving_type, "endpoints": endpoints}

    @app.get("/health")
    async def health() -> JSONResponse:
        generator = state.generator
        if state.draining or generator is None or not generator.engine.alive:
            status = "draining" if state.draining else "loading" if generator is None else "engine stopped"
            return JSONResponse({"status": status}, status_code=503)
        stats = generator.engine.stats()
        return JSONResponse({"status": "ok", "model": generator.model_name, "running": stats.running,
                             "waiting": stats.waiting, "steps": stats.steps})

    @api.get("/models")
    async def list_models(generator: Generator = Depends(state.ready)) -> ModelList:
        return ModelList(data=[ModelCard(id=name) for name in generator.served_names])

    @api.get("/models/{model_id:path}")
    async def get_model(model_id: str, generator: Generator = Depends(state.ready)) -> ModelCard:
        generator.check_model(model_id)
        return ModelCard(id=model_id)

    if config.serving_type == "whisper":
        api.include_router(audio_router(state.ready, sse, config.max_audio_mb, config.request_timeout or None))
        app.include_router(api)
        return app

    @api.post("/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request,
                               generator: Generator = Depends(state.ready)):
        generator.check_model(body.model)
        rid = f"chatcmpl-{request_id(request)}"
        ids = generator.chat_prompt(body)
        choices = generator.start(body, [(ids, "")], rid, body.n)
        if body.stream:
            return sse(chat_chunks(generator, body, choices, rid), rid)
        await generator.collect(choices, request.is_disconnected)
        return chat_response(generator, body, rid, choices)

    @api.post("/completions")
    async def completions(body: CompletionRequest, request: Request, generator: Generator = Depends(state.ready)):
        generator.check_model(body.model)
        rid = f"cmpl-{request_id(request)}"
        choices = generator.start(body, generator.completion_prompts(body), rid, body.candidates)
        if body.stream:
            return sse(completion_chunks(generator, body, choices, rid), rid)
        await generator.collect(choices, request.is_disconnected)
        return completion_response(generator, body, rid, choices)

    app.include_router(api)
    return app
