"""OpenAI chat and completions on top of the engine: prompts in, choices and SSE chunks out."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from functools import lru_cache
from typing import AsyncIterator, Awaitable, Callable

from batching import Delta, Engine, QueueFullError, SamplingParams, Sequence, TokenLogprob
from config import Config
from model_manager import LoadedModel, build_engine, load_model, load_off_loop
from models import (AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletion, ChatCompletionChunk,
                    ChatCompletionRequest, ChatDelta, ChatLogprobs, ChatTokenLogprob, Completion, CompletionChoice,
                    CompletionLogprobs, CompletionRequest, R1Settings, SamplingRequest, TopLogprob, Usage)
from reasoning import (ReasoningParser, Split, add_math_instruction, apply_few_shot_mode, boxed_answer,
                       template_opens_think)

DISCONNECT_POLL_SECONDS = 0.05

logger = logging.getLogger("batchwise.serving")


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers


@dataclass
class ServingOptions:
    served_names: tuple[str, ...]
    request_timeout: float | None = None
    reasoning_parser: str = "auto"


@dataclass
class Choice:
    index: int
    prompt_ids: list[int]
    prompt_text: str
    seq: Sequence
    text: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)

    @property
    def completion_tokens(self) -> int:
        return len(self.seq.output_ids)

    def record(self, delta: Delta) -> None:
        self.text.append(delta.text)
        self.logprobs.extend(delta.logprobs)


class Generator:
    def __init__(self, engine: Engine, loaded: LoadedModel, options: ServingOptions) -> None:
        self.engine = engine
        self.tokenizer = loaded.tokenizer
        self.served_names = options.served_names
        self.model_name = options.served_names[0]
        self.context_length = loaded.context_length
        self.request_timeout = options.request_timeout
        self.think_opened = self._think_opened(options.reasoning_parser)
        self.token_text = lru_cache(maxsize=65536)(lambda token_id: self.tokenizer.decode([token_id]))

    def _think_opened(self, parser: str) -> bool | None:
        """None: no reasoning parsing; otherwise whether the chat template itself opens the think block."""
        if parser == "none" or not self.tokenizer.chat_template:
            return None
        opened = template_opens_think(self.render([{"role": "user", "content": "hi"}]))
        return opened if parser == "deepseek_r1" or opened else None

    def check_model(self, name: str) -> None:
        check_model_name(name, self.served_names)

    def render(self, messages: list[dict[str, str]]) -> str:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def chat_prompt(self, request: ChatCompletionRequest) -> list[int]:
        if not self.tokenizer.chat_template:
            raise APIError(400, "this model has no chat template; use /v1/completions", param="messages")
        messages = [{"role": m.role, "content": m.text()} for m in request.messages]
        if request.r1_settings:
            messages = apply_few_shot_mode(messages, request.r1_settings.few_shot_mode)
            if request.r1_settings.math_mode:
                messages = add_math_instruction(messages)
        try:
            text = self.render(messages)
        except Exception as error:  # templates raise their own errors for dialogues they reject
            raise APIError(400, f"the chat template rejected these messages: {error}", param="messages") from None
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def completion_prompts(self, request: CompletionRequest) -> list[tuple[list[int], str]]:
        """(token ids, text) per prompt."""
        prompt = request.prompt
        if isinstance(prompt, str):
            prompt = [prompt]
        if all(isinstance(p, int) for p in prompt):
            prompt = [prompt]
        vocab = len(self.tokenizer)
        prompts = []
        for item in prompt:
            if isinstance(item, str):
                prompts.append((self.tokenizer(item).input_ids, item))
            elif all(0 <= t < vocab for t in item):
                prompts.append((list(item), self.tokenizer.decode(item)))
            else:
                raise APIError(400, f"token ids must lie in [0, {vocab})", param="prompt")
        return prompts

    def start(self, request: SamplingRequest, prompts: list[tuple[list[int], str]], request_id: str,
              per_prompt: int) -> list[Choice]:
        """Queue `per_prompt` sequences per prompt (sharing its prefill); all or none are queued."""
        if per_prompt > self.engine.scheduler.max_running:
            raise APIError(400, f"at most {self.engine.scheduler.max_running} choices per prompt can run together "
                                f"on this server", param="best_of" if per_prompt > request.n else "n")
        params = [self.sampling_params(request, len(ids)) for ids, _ in prompts]
        choices: list[Choice] = []
        try:
            for (ids, text), param in zip(prompts, params):
                for seq in self.engine.add_siblings(ids, param, per_prompt, request_id):
                    choices.append(Choice(len(choices), ids, text, seq))
        except QueueFullError as error:
            self.cancel(choices)
            raise APIError(429, f"{error}; retry shortly", type="rate_limit_exceeded", code="rate_limit_exceeded",
                           headers={"Retry-After": "1"}) from None
        return choices

    def cancel(self, choices: list[Choice]) -> None:
        for choice in choices:
            self.engine.cancel(choice.seq)

    def sampling_params(self, request: SamplingRequest, prompt_tokens: int) -> SamplingParams:
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
        self._check_token_ids(request.logit_bias or {}, "logit_bias")
        self._check_token_ids(request.stop_token_ids or [], "stop_token_ids")
        return SamplingParams(
            max_tokens=limit or room, temperature=request.temperature, top_p=request.top_p, top_k=request.top_k,
            min_p=request.min_p, presence_penalty=request.presence_penalty,
            frequency_penalty=request.frequency_penalty, repetition_penalty=request.repetition_penalty,
            logit_bias=tuple((request.logit_bias or {}).items()), seed=request.seed, stop=request.stop_strings,
            stop_token_ids=tuple(request.stop_token_ids or ()), ignore_eos=request.ignore_eos,
            min_tokens=min(request.min_tokens, limit or room), logprobs=request.top_logprob_count,
            prompt_logprobs=isinstance(request, CompletionRequest) and request.echo and request.logprobs is not None)

    def _check_token_ids(self, token_ids, param: str) -> None:
        vocab = len(self.tokenizer)
        bad = [t for t in token_ids if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"token id {bad[0]} is outside the vocabulary [0, {vocab})", param=param)

    async def collect(self, choices: list[Choice], disconnected: Callable[[], Awaitable[bool]]) -> None:
        """Wait for every choice to finish; if the client goes away or time runs out, cancel them all."""
        async def drain(choice: Choice) -> None:
            async for delta in self.engine.stream(choice.seq):
                check_error(delta)
                choice.record(delta)

        try:
            await finish_unless_abandoned(asyncio.gather(*(drain(c) for c in choices)), disconnected,
                                          self.request_timeout)
        finally:
            self.cancel(choices)

    async def deltas(self, choices: list[Choice]) -> AsyncIterator[tuple[Choice, Delta]]:
        """Deltas of all choices as they arrive, merged; closing the iterator cancels every choice."""
        queue: asyncio.Queue[tuple[Choice, Delta]] = asyncio.Queue()

        async def pump(choice: Choice) -> None:
            async for delta in self.engine.stream(choice.seq):
                await queue.put((choice, delta))

        pumps = [asyncio.create_task(pump(c)) for c in choices]
        deadline = deadline_after(self.request_timeout)
        unfinished = len(choices)
        try:
            while unfinished:
                try:
                    choice, delta = await asyncio.wait_for(queue.get(), timeout=deadline - time.monotonic())
                except TimeoutError:
                    raise timeout_error(self.request_timeout) from None
                check_error(delta)
                choice.record(delta)
                unfinished -= delta.finish_reason is not None
                yield choice, delta
        finally:
            for task in pumps:
                task.cancel()
            self.cancel(choices)

    def chat_logprobs(self, logprobs: list[TokenLogprob]) -> ChatLogprobs:
        def entry(token_id: int, logprob: float) -> dict:
            text = self.token_text(token_id)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode())}
        return ChatLogprobs(content=[
            ChatTokenLogprob(**entry(t.token_id, t.logprob),
                             top_logprobs=[TopLogprob(**entry(i, lp)) for i, lp in t.top])
            for t in logprobs])

    def completion_logprobs(self, logprobs: list[TokenLogprob | None], offset: int) -> CompletionLogprobs:
        result = CompletionLogprobs()
        for item in logprobs:
            token_id = item.token_id if item else None
            text = self.token_text(token_id) if token_id is not None else ""
            result.tokens.append(text)
            result.token_logprobs.append(item.logprob if item else None)
            result.top_logprobs.append({self.token_text(i): lp for i, lp in item.top} if item else None)
            result.text_offset.append(offset)
            offset += len(text)
        return result


def deadline_after(timeout: float | None) -> float:
    """The monotonic time a request given `timeout` seconds must end by (never, without one)."""
    return time.monotonic() + timeout if timeout else float("inf")


async def finish_unless_abandoned(work: Awaitable[None], disconnected: Callable[[], Awaitable[bool]],
                                  timeout: float | None = None) -> None:
    """Await the work; cancel it if the client goes away first, or if it outlasts the timeout (408)."""
    task = asyncio.ensure_future(work)
    deadline = deadline_after(timeout)
    try:
        while not task.done():
            await asyncio.wait([task], timeout=DISCONNECT_POLL_SECONDS)
            if task.done():
                break
            if time.monotonic() > deadline:
                raise timeout_error(timeout)
            if await disconnected():
                task.cancel()
        await task
    finally:
        task.cancel()


def check_model_name(name: str, served_names: tuple[str, ...], aliases: tuple[str, ...] = ()) -> None:
    if name not in served_names and name not in aliases:
        raise APIError(404, f"The model '{name}' does not exist. Served models: {', '.join(served_names)}",
                       param="model", code="model_not_found")


async def start_chat_service(config: Config) -> Generator:
    loaded = await load_off_loop(load_model, config)
    engine = build_engine(loaded, config)
    engine.start()
    options = ServingOptions(config.served_names(loaded.name), config.request_timeout or None,
                             config.reasoning_parser)
    logger.info("serving %s on http://%s:%d", ", ".join(options.served_names), config.host, config.port)
    return Generator(engine, loaded, options)


def timeout_error(seconds: float | None) -> APIError:
    return APIError(408, f"the request did not finish within the server's {seconds:g} s request timeout",
                    type="timeout_error", code="request_timeout")


def check_error(delta: Delta) -> None:
    if delta.finish_reason == "error":
        raise APIError(500, "the engine failed while generating this response", type="server_error")


def usage(choices: list[Choice]) -> Usage:
    prompts = {id(c.prompt_ids): len(c.prompt_ids) for c in choices}
    prompt = sum(prompts.values())
    completion = sum(c.completion_tokens for c in choices)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


class ChatOutput:
    """Turns a choice's text into content (and reasoning_content), in one go or delta by delta."""

    def __init__(self, think_opened: bool | None, settings: R1Settings | None) -> None:
        self.parser = ReasoningParser(think_opened) if think_opened is not None else None
        self.settings = settings or R1Settings()
        self.content: list[str] = []

    def feed(self, text: str) -> Split:
        return self._shape(self.parser.feed(text) if self.parser else Split(content=text))

    def finish(self) -> Split:
        split = self._shape(self.parser.finish() if self.parser else Split())
        if self.settings.math_mode:
            content = "".join(self.content)
            split.content = boxed_answer(content) or content
        return split

    def _shape(self, split: Split) -> Split:
        if not self.settings.return_think_data:
            split.reasoning = ""
        if self.settings.math_mode:  # only the boxed answer is returned, so content waits for the end
            self.content.append(split.content)
            split.content = ""
        return split


def chat_response(generator: Generator, request: ChatCompletionRequest, request_id: str,
                  choices: list[Choice]) -> ChatCompletion:
    def message(choice: Choice) -> AssistantMessage:
        output = ChatOutput(generator.think_opened, request.r1_settings)
        first, last = output.feed("".join(choice.text)), output.finish()
        reasoning = first.reasoning + last.reasoning
        return AssistantMessage(content=first.content + last.content,
                                reasoning_content=reasoning if output.parser and reasoning else None)

    return ChatCompletion(id=request_id, model=request.model, usage=usage(choices), choices=[
        ChatChoice(index=c.index, message=message(c), finish_reason=c.seq.finish_reason,
                   logprobs=generator.chat_logprobs(c.logprobs) if request.logprobs else None)
        for c in choices])


def best_choices(choices: list[Choice], per_prompt: int, keep: int) -> list[Choice]:
    """The `keep` most likely of each prompt's candidates (by cumulative logprob), re-indexed."""
    best = []
    for start in range(0, len(choices), per_prompt):
        candidates = choices[start:start + per_prompt]
        best.extend(sorted(candidates, key=lambda c: c.seq.cumulative_logprob, reverse=True)[:keep])
    for index, choice in enumerate(best):
        choice.index = index
    return best


def completion_response(generator: Generator, request: CompletionRequest, request_id: str,
                        choices: list[Choice]) -> Completion:
    shown = best_choices(choices, request.candidates, request.n)

    def choice_body(choice: Choice) -> CompletionChoice:
        prefix = choice.prompt_text if request.echo else ""
        logprobs = None
        if request.logprobs is not None:
            entries = (choice.seq.prompt_logprobs if request.echo else []) + choice.logprobs
            logprobs = generator.completion_logprobs(entries, 0)
        return CompletionChoice(index=choice.index, text=prefix + "".join(choice.text),
                                finish_reason=choice.seq.finish_reason, logprobs=logprobs)

    return Completion(id=request_id, model=request.model, usage=usage(choices), choices=[choice_body(c) for c in shown])


async def chat_chunks(generator: Generator, request: ChatCompletionRequest, choices: list[Choice],
                      request_id: str) -> AsyncIterator[ChatCompletionChunk]:
    def chunk(*chunk_choices: ChatChunkChoice, usage_: Usage | None = None) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=request_id, model=request.model, choices=list(chunk_choices), usage=usage_)

    outputs = {c.index: ChatOutput(generator.think_opened, request.r1_settings) for c in choices}
    for choice in choices:
        yield chunk(ChatChunkChoice(index=choice.index, delta=ChatDelta(role="assistant", content="")))
    async for choice, delta in generator.deltas(choices):
        output = outputs[choice.index]
        split = output.feed(delta.text)
        if delta.finish_reason:
            tail = output.finish()
            split = Split(split.reasoning + tail.reasoning, split.content + tail.content)
        logprobs = generator.chat_logprobs(delta.logprobs) if request.logprobs else None
        if split.reasoning or split.content or logprobs:
            yield chunk(ChatChunkChoice(index=choice.index, logprobs=logprobs, delta=ChatDelta(
                content=split.content or None, reasoning_content=split.reasoning or None)))
        if delta.finish_reason:
            yield chunk(ChatChunkChoice(index=choice.index, delta=ChatDelta(), finish_reason=delta.finish_reason))
    if request.include_usage:
        yield chunk(usage_=usage(choices))


async def completion_chunks(generator: Generator, request: CompletionRequest, choices: list[Choice],
                            request_id: str) -> AsyncIterator[Completion]:
    def chunk(*chunk_choices: CompletionChoice, usage_: Usage | None = None) -> Completion:
        return Completion(id=request_id, model=request.model, choices=list(chunk_choices), usage=usage_)

    offsets = {c.index: 0 for c in choices}
    echoed: set[int] = set()

    def echo(choice: Choice) -> Completion:
        """The prompt, sent with the choice's first delta: prompt logprobs exist once it is prefilled."""
        echoed.add(choice.index)
        offsets[choice.index] = len(choice.prompt_text)
        logprobs = None
        if request.logprobs is not None:
            logprobs = generator.completion_logprobs(choice.seq.prompt_logprobs, 0)
        return chunk(CompletionChoice(index=choice.index, text=choice.prompt_text, logprobs=logprobs))

    async for choice, delta in generator.deltas(choices):
        if request.echo and choice.index not in echoed:
            yield echo(choice)
        logprobs = None
        if request.logprobs is not None:
            logprobs = generator.completion_logprobs(delta.logprobs, offsets[choice.index])
            offsets[choice.index] += sum(len(t) for t in logprobs.tokens)
        if delta.text or delta.finish_reason or logprobs:
            yield chunk(CompletionChoice(index=choice.index, text=delta.text, finish_reason=delta.finish_reason,
                                         logprobs=logprobs))
    if request.include_usage:
        yield chunk(usage_=usage(choices))
