"""/v1/embeddings: each input tokenised (or taken as the token ids it is) and checked against the model, queued as
one pooled sequence, and its vector cut to `dimensions` where the model was trained for that (Matryoshka), then
written as floats or as base64 (the float32 values' little-endian bytes, which OpenAI's SDK asks for and
decodes). /rerank: documents scored against a query by a cross-encoder, or by an embedding model's cosine."""

from __future__ import annotations

import asyncio
import base64
import logging
from typing import Awaitable, Callable

import numpy as np

from batching import Engine, QueueFullError, SamplingParams, Sequence
from batching.pooling import TokenTypes
from config import Config
from model_manager import LoadedEmbedder, build_embedding_engine, load_embedder
from models import (Embedding, EmbeddingRequest, EmbeddingResponse, EmbeddingUsage, RerankDocument, RerankRequest,
                    RerankResponse, RerankResult, RerankUsage)
from serving.errors import APIError, check_error, check_model_name, server_busy
from serving.metrics import Metrics
from serving.startup import StartupProgress, started_engine
from serving.timeouts import finish_unless_abandoned

logger = logging.getLogger("batchwise.serving")

POOLED = SamplingParams(max_tokens=0, pooled=True)


class EmbeddingService:
    def __init__(self, engine: Engine, loaded: LoadedEmbedder, served_names: tuple[str, ...],
                 request_timeout: float | None = None) -> None:
        self.engine = engine
        self.metrics: Metrics | None = None
        self.tokenizer = loaded.tokenizer
        self.served_names = served_names
        self.model_name = served_names[0]
        self.context_length = loaded.max_length  # the longest input, as /v1/models reports it
        self.dimensions = loaded.dimensions
        self.matryoshka_dimensions = loaded.matryoshka_dimensions
        self.normalized = loaded.pooling.normalize
        self.cross_encoder = loaded.cross_encoder
        self.request_timeout = request_timeout

    def check_model(self, name: str) -> None:
        check_model_name(name, self.served_names)

    def kv_tokens(self) -> None:
        """An embedding model keeps no K/V: there is no budget to report."""
        return None

    async def embed(self, request: EmbeddingRequest, request_id: str,
                    disconnected: Callable[[], Awaitable[bool]]) -> EmbeddingResponse:
        self.check_model(request.model)
        if self.cross_encoder:
            raise APIError(400, f"{self.model_name} is a cross-encoder: it scores query-document pairs on /rerank "
                                "and embeds nothing", param="model", code="model_not_embedding")
        self.check_dimensions(request.dimensions)
        prompts = self.prompts(request.inputs, "input")
        vectors = await self.run(prompts, [None] * len(prompts), request_id, request.user or "", disconnected)
        tokens = sum(map(len, prompts))
        logger.info("request %s: %d embeddings of %d tokens", request_id, len(prompts), tokens,
                    extra={"request_id": request_id, "prompt_tokens": tokens})
        data = [Embedding(index=index, embedding=self.encoded(vector, request)) for index, vector in enumerate(vectors)]
        return EmbeddingResponse(data=data, model=request.model, usage=EmbeddingUsage(prompt_tokens=tokens,
                                                                                      total_tokens=tokens))

    async def rerank(self, request: RerankRequest, request_id: str,
                     disconnected: Callable[[], Awaitable[bool]]) -> RerankResponse:
        """Each document's relevance to the query: a cross-encoder's score of the pair, or the cosine of an embedding
        model's vectors of the query and the document; best first."""
        self.check_model(request.model)
        documents, user = request.documents, request.user or ""
        if self.cross_encoder:
            pairs = self.tokenizer([request.query] * len(documents), documents)
            prompts = self.prompts(pairs.input_ids, "documents")
            types = [TokenTypes(ids) for ids in pairs.token_type_ids] if "token_type_ids" in pairs else None
            outputs = await self.run(prompts, types or [None] * len(prompts), request_id, user, disconnected)
            scores = [float(output[0]) for output in outputs]
        else:
            prompts = self.prompts([request.query], "query") + self.prompts(documents, "documents")
            query, *vectors = await self.run(prompts, [None] * len(prompts), request_id, user, disconnected)
            scores = [float(np.dot(query, vector) / (np.linalg.norm(query) * np.linalg.norm(vector)))
                      for vector in vectors]
        best = sorted(range(len(documents)), key=lambda index: -scores[index])[:request.top_n or None]
        results = [RerankResult(index=index, relevance_score=scores[index],
                                document=RerankDocument(text=documents[index]) if request.return_documents else None)
                   for index in best]
        return RerankResponse(id=f"rerank-{request_id}", model=request.model, results=results,
                              usage=RerankUsage(total_tokens=sum(map(len, prompts))))

    def prompts(self, inputs: list[str] | list[list[int]], param: str) -> list[list[int]]:
        """Texts tokenised as the model was trained (with its special tokens); token ids as they are."""
        if isinstance(inputs[0], str):
            prompts = self.tokenizer(inputs).input_ids
        else:
            prompts = inputs
            vocab = len(self.tokenizer)
            bad = next((t for prompt in prompts for t in prompt if not 0 <= t < vocab), None)
            if bad is not None:
                raise APIError(400, f"token id {bad} is outside the vocabulary [0, {vocab})", param=param)
        for index, prompt in enumerate(prompts):
            if len(prompt) > self.context_length:
                which = f"{param.removesuffix('s')} {index}" if len(prompts) > 1 else f"your {param.removesuffix('s')}"
                raise APIError(400, f"This model's maximum input length is {self.context_length} tokens. However, "
                                    f"{which} has {len(prompt)} tokens.", param=param, code="context_length_exceeded")
        return prompts

    async def run(self, prompts: list[list[int]], inputs: list[TokenTypes | None], request_id: str, user: str,
                  disconnected: Callable[[], Awaitable[bool]]) -> list[np.ndarray]:
        """Each prompt's pooled output, computed by the engine; cancelled if the client leaves or time runs out."""
        seqs = self.start(prompts, inputs, request_id, user)
        vectors: list[np.ndarray] = [np.empty(0)] * len(seqs)

        async def collect(index: int, seq: Sequence) -> None:
            async for delta in self.engine.stream(seq):
                check_error(delta)
                vectors[index] = delta.embedding

        try:
            await finish_unless_abandoned(asyncio.gather(*(collect(i, seq) for i, seq in enumerate(seqs))),
                                          disconnected, self.request_timeout)
        finally:
            for seq in seqs:
                self.engine.cancel(seq)
        return vectors

    def check_dimensions(self, dimensions: int | None) -> None:
        if dimensions is None or dimensions == self.dimensions:
            return
        if self.matryoshka_dimensions is None:
            raise APIError(400, f"{self.model_name} was not trained to have its embeddings shortened (Matryoshka): "
                                f"they have {self.dimensions} dimensions; leave dimensions out", param="dimensions")
        if dimensions > self.dimensions:
            raise APIError(400, f"{self.model_name}'s embeddings have {self.dimensions} dimensions: dimensions can "
                                "only shorten them", param="dimensions")
        if self.matryoshka_dimensions and dimensions not in self.matryoshka_dimensions:
            raise APIError(400, f"{self.model_name} was trained to be shortened to "
                                f"{', '.join(map(str, self.matryoshka_dimensions))} dimensions", param="dimensions")

    def start(self, prompts: list[list[int]], inputs: list[TokenTypes | None], request_id: str,
              user: str) -> list[Sequence]:
        """One pooled sequence per input, all queued or none."""
        if len(prompts) > self.engine.scheduler.max_pending:
            raise APIError(400, f"this server queues at most {self.engine.scheduler.max_pending} inputs at once "
                                f"(--max-concurrent); this request has {len(prompts)}", param="input")
        seqs: list[Sequence] = []
        try:
            for prompt, prompt_inputs in zip(prompts, inputs):
                seqs.append(self.engine.add(prompt, POOLED, request_id, prompt_inputs, user=user))
        except QueueFullError as error:
            for seq in seqs:
                self.engine.cancel(seq)
            raise server_busy(error) from None
        return seqs

    def encoded(self, vector: np.ndarray, request: EmbeddingRequest) -> list[float] | str:
        if request.dimensions is not None and request.dimensions < len(vector):
            vector = vector[:request.dimensions]
            if self.normalized:
                vector = vector / np.linalg.norm(vector)
        if request.encoding_format == "base64":
            return base64.b64encode(vector.astype("<f4").tobytes()).decode()
        return vector.tolist()


async def start_embedding_service(config: Config, progress: StartupProgress) -> EmbeddingService:
    loaded, engine = await started_engine(config, progress, load_embedder, build_embedding_engine)
    service = EmbeddingService(engine, loaded, config.served_names(loaded.name), config.request_timeout or None)
    logger.info("serving %s (embeddings) on http://%s:%d", ", ".join(service.served_names), config.host, config.port)
    return service
