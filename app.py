"""FastAPI app factory: the model starts in the lifespan, routers per endpoint family under /v1, errors in
the OpenAI shape, request ids, CORS and API keys; the browser playground at /."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from pathlib import Path
from typing import NoReturn

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST

from api.audio import audio_router
from api.auth import api_key_checker
from api.embeddings import embeddings_router, rerank_router
from api.errors import install_error_handlers
from api.lora import lora_router
from api.middleware import RequestCountMiddleware, RequestIdMiddleware
from api.responses import responses_router
from api.state import ServerState, Service
from api.text import text_router
from api.tokenize import tokenizer_router
from config import Config
from models import ModelCard, ModelList, VersionInfo
from serving.embeddings import start_embedding_service
from serving.text_service import TextService, start_chat_service
from serving.metrics import Metrics
from serving.responses import ResponseStore
from serving.transcription import start_transcription_service

__version__ = "0.1.0"
FAULT_EXIT_DELAY = 1.0  # seconds
PLAYGROUND = Path(__file__).resolve().parent / "playground"

logger = logging.getLogger("batchwise")

CHAT_ENDPOINTS = ["/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/embeddings", "/v1/models",
                  "/tokenize", "/detokenize", "/health"]
WHISPER_ENDPOINTS = ["/v1/audio/transcriptions", "/v1/audio/translations", "/v1/audio/timings", "/v1/models",
                     "/health"]
EMBEDDING_ENDPOINTS = ["/v1/embeddings", "/v1/rerank", "/rerank", "/v1/models", "/health"]
ENDPOINTS = {"chat": CHAT_ENDPOINTS, "whisper": WHISPER_ENDPOINTS, "embedding": EMBEDDING_ENDPOINTS}
STARTS = {"chat": start_chat_service, "whisper": start_transcription_service, "embedding": start_embedding_service}


def exit_process(reason: str) -> NoReturn:
    """Exit at once: a wedged torch thread would keep a normal interpreter exit waiting forever."""
    logger.critical("%s: exiting", reason)
    logging.shutdown()
    os._exit(1)


def create_app(config: Config) -> FastAPI:
    state = ServerState()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        starting = asyncio.create_task(start_service())
        try:
            yield
        finally:
            starting.cancel()
            await asyncio.gather(starting, return_exceptions=True)
            if state.service:
                await state.service.engine.stop()

    async def start_service() -> None:
        """Start the model's service, then watch its engine: a server that cannot serve exits non-zero, so
        that its supervisor (Docker, Kubernetes, systemd) restarts it."""
        try:
            service = await STARTS[config.serving_type](config, state.progress)
        except Exception as error:
            logger.exception("could not start serving %s", config.hf_model)
            exit_process(f"the {config.serving_type} service could not start: {error}")
        service.metrics = metrics
        metrics.serve(service.model_name, service.engine, service.kv_tokens)
        state.service = service
        fault = await state.service.engine.stopped()
        if fault:
            await asyncio.sleep(FAULT_EXIT_DELAY)  # let the failed requests' error responses go out
            exit_process(f"the engine stopped ({fault})")

    metrics = Metrics()
    app = FastAPI(title="Batchwise", version=__version__, lifespan=lifespan)
    app.state.server = state
    install_error_handlers(app)
    app.add_middleware(RequestCountMiddleware, metrics=metrics)
    app.add_middleware(RequestIdMiddleware)
    if config.origins:
        app.add_middleware(CORSMiddleware, allow_origins=config.origins, allow_methods=["*"], allow_headers=["*"])

    app.mount("/playground", StaticFiles(directory=PLAYGROUND), name="playground")

    @app.get("/", response_model=None)
    async def root(request: Request, response: Response) -> dict | FileResponse:
        """The playground for a browser; the server's description for API clients (the page asks for both)."""
        if "text/html" in request.headers.get("accept", ""):
            return FileResponse(PLAYGROUND / "index.html", headers={"Vary": "Accept"})
        response.headers["Vary"] = "Accept"
        service = state.service
        return {"name": "Batchwise", "version": __version__, "model": service.model_name if service else None,
                "serving_type": config.serving_type, "endpoints": ENDPOINTS[config.serving_type]}

    @app.get("/version")
    async def version() -> VersionInfo:
        """vLLM's; open like / (which shows the version too)."""
        return VersionInfo(version=__version__)

    @app.get("/health")
    async def health() -> JSONResponse:
        status_code, body = state.health()
        return JSONResponse(body, status_code=status_code)

    require_key = Depends(api_key_checker(config.api_keys()))

    @app.get("/metrics", dependencies=[] if config.metrics_public else [require_key])
    async def prometheus_metrics() -> Response:
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    api = APIRouter(prefix="/v1", dependencies=[require_key])

    def model_cards(service: Service) -> list[ModelCard]:
        """The model by each of its names, then its LoRA adapters (vLLM's cards: the folder and the base)."""
        adapters = service.lora_adapters() if isinstance(service, TextService) else []
        return [*(ModelCard(id=name, max_model_len=service.context_length) for name in service.served_names),
                *(ModelCard(id=adapter.name, root=adapter.path, parent=service.model_name,
                            max_model_len=service.context_length) for adapter in adapters)]

    @api.get("/models", response_model_exclude_none=True)
    async def list_models(service: Service = Depends(state.ready)) -> ModelList:
        return ModelList(data=model_cards(service))

    @api.get("/models/{model_id:path}", response_model_exclude_none=True)
    async def get_model(model_id: str, service: Service = Depends(state.ready)) -> ModelCard:
        service.check_model(model_id)
        return next((card for card in model_cards(service) if card.id == model_id),
                    ModelCard(id=model_id, max_model_len=service.context_length))  # an alias (Whisper's)

    if config.serving_type == "whisper":
        api.include_router(audio_router(state.ready, config.max_audio_mb, config.request_timeout or None))
    elif config.serving_type == "chat":
        api.include_router(text_router(state.ready))
        api.include_router(responses_router(state.ready, ResponseStore(config.responses_store_size)))
        if config.lora and config.allow_runtime_lora_updating:
            api.include_router(lora_router(state.ready))
    api.include_router(embeddings_router(state.ready))  # a server that cannot embed says so
    api.include_router(rerank_router(state.ready))
    app.include_router(api)
    app.include_router(rerank_router(state.ready), dependencies=[require_key])
    app.include_router(tokenizer_router(state.ready), dependencies=[require_key])
    return app
