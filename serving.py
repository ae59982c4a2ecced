"""OpenAI chat and completions on top of the engine: prompts in, choices and SSE chunks out."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import AsyncIterator, Awaitable, Callable

from batching import Delta, Engine, QueueFullError, SamplingParams, Sequence
from model_manager import LoadedModel
from models import (AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletion, ChatCompletionChunk,
                    ChatCompletionRequest, ChatDelta, Completion, CompletionChoice, CompletionRequest,
                    SamplingRequest, Usage)

DISCONNECT_POLL_SECONDS = 0.05


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers


@dataclass
class Choice:
    index: int
    prompt_tokens: int
    seq: Sequence
    text: list[str] = field(default_factory=list)

    @property
    def completion_tokens(self) -> int:
        return len(self.seq.output_ids)


class Generator:
    def __init__(self, engine: Engine, loaded: LoadedModel) -> None:
        self.engine = engine
        self.tokenizer = loaded.tokenizer
        self.model_name = loaded.name
        self.context_length = loaded.context_length

    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise APIError(404, f"The model '{name}' does not exist. Served models: {self.model_name}",
                           param="model", code="model_not_found")

    def chat_prompt(self, request: ChatCompletionRequest) -> list[int]:
        if not self.tokenizer.chat_template:
            raise APIError(400, "this model has no chat template; use /v1/completions", param="messages")
        messages = [{"role": m.role, "content": m.text()} for m in request.messages]
        try:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as error:  # templates raise their own errors for dialogues they reject
            raise APIError(400, f"the chat template rejected these messages: {error}", param="messages") from None
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def completion_prompts(self, request: CompletionRequest) -> list[list[int]]:
        prompt = request.prompt
        if isinstance(prompt, str):
            prompt = [prompt]
        if all(isinstance(p, int) for p in prompt):
            return [list(prompt)]
        prompts = [p if isinstance(p, list) else self.tokenizer(p).input_ids for p in prompt]
        vocab = len(self.tokenizer)
        if any(not 0 <= t < vocab for p in prompts for t in p):
            raise APIError(400, f"token ids must lie in [0, {vocab})", param="prompt")
        return prompts

    def start(self, request: SamplingRequest, prompts: list[list[int]], request_id: str) -> list[Choice]:
        params = [self._params(request, len(p)) for p in prompts]
        choices: list[Choice] = []
        try:
            for index, (prompt, param) in enumerate(zip(prompts, params)):
                choices.append(Choice(index, len(prompt), self.engine.add(prompt, param, request_id)))
        except QueueFullError as error:
            self.cancel(choices)
            raise APIError(429, str(error), type="rate_limit_exceeded", code="rate_limit_exceeded",
                           headers={"Retry-After": "1"}) from None
        return choices

    def cancel(self, choices: list[Choice]) -> None:
        for choice in choices:
            self.engine.cancel(choice.seq)

    def _params(self, request: SamplingRequest, prompt_tokens: int) -> SamplingParams:
        if prompt_tokens == 0:
            raise APIError(400, "the prompt is empty", param="prompt")
        room = self.context_length - prompt_tokens
        limit = request.completion_limit
        if room < 1 or (limit is not None and limit > room):
            asked = f" plus {limit} completion tokens" if limit is not None else ""
            raise APIError(400, f"This model's maximum context length is {self.context_length} tokens. "
                                f"However, you requested {prompt_tokens} prompt tokens{asked}.",
                           param="messages" if isinstance(request, ChatCompletionRequest) else "prompt",
                           code="context_length_exceeded")
        return SamplingParams(max_tokens=limit or room, temperature=request.temperature, top_p=request.top_p,
                              seed=request.seed, stop=request.stop_strings)

    async def collect(self, choices: list[Choice], disconnected: Callable[[], Awaitable[bool]]) -> None:
        """Wait for every choice to finish; if the client goes away first, cancel them all."""
        async def drain(choice: Choice) -> None:
            async for delta in self.engine.stream(choice.seq):
                check_error(delta)
                choice.text.append(delta.text)

        work = asyncio.gather(*(drain(c) for c in choices))
        try:
            while not work.done():
                await asyncio.wait([work], timeout=DISCONNECT_POLL_SECONDS)
                if not work.done() and await disconnected():
                    work.cancel()
            await work
        finally:
            self.cancel(choices)

    async def deltas(self, choices: list[Choice]) -> AsyncIterator[tuple[Choice, Delta]]:
        """Deltas of all choices as they arrive, merged; closing the iterator cancels every choice."""
        queue: asyncio.Queue[tuple[Choice, Delta]] = asyncio.Queue()

        async def pump(choice: Choice) -> None:
            async for delta in self.engine.stream(choice.seq):
                await queue.put((choice, delta))

        pumps = [asyncio.create_task(pump(c)) for c in choices]
        try:
            for _ in range(len(choices)):
                while True:
                    choice, delta = await queue.get()
                    check_error(delta)
                    yield choice, delta
                    if delta.finish_reason:
                        break
        finally:
            for task in pumps:
                task.cancel()
            self.cancel(choices)


def check_error(delta: Delta) -> None:
    if delta.finish_reason == "error":
        raise APIError(500, "the engine failed while generating this response", type="server_error")


def usage(choices: list[Choice]) -> Usage:
    prompt = sum(c.prompt_tokens for c in choices)
    completion = sum(c.completion_tokens for c in choices)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def chat_response(request_id: str, model: str, choices: list[Choice]) -> ChatCompletion:
    return ChatCompletion(id=request_id, model=model, usage=usage(choices), choices=[
        ChatChoice(index=c.index, message=AssistantMessage(content="".join(c.text)), finish_reason=c.seq.finish_reason)
        for c in choices])


def completion_response(request_id: str, model: str, choices: list[Choice]) -> Completion:
    return Completion(id=request_id, model=model, usage=usage(choices), choices=[
        CompletionChoice(index=c.index, text="".join(c.text), finish_reason=c.seq.finish_reason) for c in choices])


async def chat_chunks(generator: Generator, request: ChatCompletionRequest, choices: list[Choice],
                      request_id: str) -> AsyncIterator[ChatCompletionChunk]:
    def chunk(*chunk_choices: ChatChunkChoice, usage_: Usage | None = None) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=request_id, model=generator.model_name, choices=list(chunk_choices),
                                   usage=usage_)

    for choice in choices:
        yield chunk(ChatChunkChoice(index=choice.index, delta=ChatDelta(role="assistant", content="")))
    async for choice, delta in generator.deltas(choices):
        if delta.text:
            yield chunk(ChatChunkChoice(index=choice.index, delta=ChatDelta(content=delta.text)))
        if delta.finish_reason:
            yield chunk(ChatChunkChoice(index=choice.index, delta=ChatDelta(), finish_reason=delta.finish_reason))
    if request.include_usage:
        yield chunk(usage_=usage(choices))


async def completion_chunks(generator: Generator, request: CompletionRequest, choices: list[Choice],
                            request_id: str) -> AsyncIterator[Completion]:
    def chunk(*chunk_choices: CompletionChoice, usage_: Usage | None = None) -> Completion:
        return Completion(id=request_id, model=generator.model_name, choices=list(chunk_choices), usage=usage_)

    async for choice, delta in generator.deltas(choices):
        if delta.text or delta.finish_reason:
            yield chunk(CompletionChoice(index=choice.index, text=delta.text, finish_reason=delta.finish_reason))
    if request.include_usage:
        yield chunk(usage_=usage(choices))
