"""The text service: what chat, completions and responses share on top of the engine (sampling settings checked
against the model, the output grammar, choices queued together and cancelled together, their deltas merged,
logprobs and usage in OpenAI's shapes), and its start-up from the configuration."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, field
from functools import lru_cache, partial
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable, Mapping, NamedTuple

from batching import Delta, Engine, QueueFullError, SamplingParams, Sequence, TokenLogprob
from batching.families.encoder_decoder import TextInput
from batching.lora_adapters import AdapterError, LoraAdapter
from batching.torch_thread import on_torch_thread
from batching.vision import ImageInputs, image_token_id
from config import Config
from model_manager import (BackgroundCompile, LoadedModel, build_engine, decoder_embedder, load_model,
                           sampling_defaults, start_background_compile)
from models import (ChatCompletionRequest, ChatLogprobs, ChatTokenLogprob, CompletionLogprobs, CompletionRequest,
                    PromptTokensDetails, SamplingRequest, TopLogprob, Usage)
from serving.embeddings import EmbeddingService
from serving.errors import APIError, check_error, check_model_name, server_busy, timeout_error
from serving.grammars import CompiledGrammar, GrammarCompiler
from serving.images import ImageLimits
from serving.metrics import Metrics
from serving.startup import StartupProgress, started_engine
from serving.template import ChatTemplate
from serving.timeouts import finish_unless_abandoned

logger = logging.getLogger("batchwise.serving")


@dataclass
class ServingOptions:
    served_names: tuple[str, ...]
    request_timeout: float | None = None
    reasoning_parser: str = "auto"
    tool_call_parser: str = "auto"
    image_limits: ImageLimits | None = None
    default_seed: int | None = None  # for requests without a seed
    max_logprobs: int | None = None  # alternatives per token; None: OpenAI's limit for the endpoint
    chat_template: str | None = None  # in place of the model's own
    sampling_defaults: Mapping[str, float] = field(default_factory=dict)  # for the fields a request leaves unset


class Prompt(NamedTuple):
    ids: list[int]
    text: str = ""  # what a completion echoes
    images: ImageInputs | None = None  # a vision-language model's images among the ids


@dataclass
class Choice:
    index: int
    prompt_ids: list[int]
    prompt_text: str
    seq: Sequence
    text: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    token_times: list[float] = field(default_factory=list)  # when each delta with tokens arrived

    @property
    def completion_tokens(self) -> int:
        return len(self.seq.output_ids)

    def record(self, delta: Delta) -> None:
        self.text.append(delta.text)
        self.logprobs.extend(delta.logprobs)
        if delta.token_ids:
            self.token_times.append(time.monotonic())


class TextService:
    def __init__(self, engine: Engine, loaded: LoadedModel, options: ServingOptions) -> None:
        """Takes a second or so (the grammar engine indexes the vocabulary): build it off the event loop."""
        self.engine = engine
        self.metrics: Metrics | None = None
        self.background_compile: BackgroundCompile | None = None  # --torch-compile auto's, on a first start
        vocab_size = loaded.model.get_output_embeddings().out_features  # the logits' width
        self.grammars = GrammarCompiler(loaded.tokenizer, vocab_size, loaded.eos_token_ids)
        self.tokenizer = loaded.tokenizer
        self.template = ChatTemplate(loaded.tokenizer, loaded.processor, loaded.encoder_decoder,
                                     image_token_id(loaded.model), options.reasoning_parser, options.tool_call_parser,
                                     options.chat_template)
        self.sampling_defaults = checked_defaults(options.sampling_defaults)
        self.encoder_decoder = loaded.encoder_decoder
        self.encoder_length = loaded.encoder_length
        self.decoder_prompt = loaded.decoder_prompt if loaded.encoder_decoder else []
        self.image_limits = options.image_limits
        self.served_names = options.served_names
        self.model_name = options.served_names[0]
        self.context_length = loaded.context_length
        self.request_timeout = options.request_timeout
        self.default_seed = options.default_seed
        self.max_logprobs = options.max_logprobs
        self.token_text = lru_cache(maxsize=65536)(lambda token_id: self.tokenizer.decode([token_id]))
        self.adapters = loaded.adapters
        embedder = decoder_embedder(loaded, min(loaded.context_length, engine.max_sequence_tokens))
        # /v1/embeddings: prompts the engine prefills beside generating rows, their hidden state pooled
        self.embeddings = EmbeddingService(engine, embedder, self.served_names, self.request_timeout) \
            if embedder else None

    def check_model(self, name: str) -> None:
        self.adapter(name)

    def adapter(self, name: str) -> LoraAdapter | None:
        """The LoRA adapter a request's model names, None for the base model; a 404 that lists every name for
        anything else."""
        adapters = self.lora_adapters()
        check_model_name(name, (*self.served_names, *(adapter.name for adapter in adapters)))
        return next((adapter for adapter in adapters if adapter.name == name), None)

    def lora_adapters(self) -> list[LoraAdapter]:
        return list(self.adapters.by_name.values()) if self.adapters else []

    async def load_adapter(self, name: str, path: str) -> LoraAdapter:
        """Read a PEFT adapter folder into a free slot, on the torch thread (between steps); a 400 with the reason
        when it cannot be served."""
        if self.adapters is None:
            raise APIError(400, "this server serves no LoRA adapters: start it with --enable-lora", param="lora_name")
        try:
            return await on_torch_thread(self.adapters.load, name, path)
        except AdapterError as error:
            raise APIError(400, str(error), param=error.param) from None

    def unload_adapter(self, name: str) -> LoraAdapter:
        """New requests no longer find it; those running finish with it (its slot is reused after them)."""
        adapter = next((adapter for adapter in self.lora_adapters() if adapter.name == name), None)
        if adapter is None:
            loaded = ", ".join(a.name for a in self.lora_adapters()) or "none"
            raise APIError(404, f"The LoRA adapter '{name}' cannot be found. Loaded adapters: {loaded}",
                           param="lora_name", code="model_not_found")
        return self.adapters.unload(name)

    def kv_tokens(self) -> tuple[int, int]:
        """KV positions in use, and the budget's."""
        memory = self.engine.scheduler.memory
        return memory.used_tokens, memory.tokens

    async def output_grammar(self, request: SamplingRequest) -> CompiledGrammar | None:
        """The grammar the reply must follow, compiled off the event loop (and cached); None if free."""
        compile_grammar = self._grammar_job(request)
        return await asyncio.to_thread(compile_grammar) if compile_grammar else None

    def _grammar_job(self, request: SamplingRequest):
        grammars = self.grammars
        if isinstance(request, ChatCompletionRequest) and request.forced_tools:
            tools = [tool.function.model_dump(exclude_none=True) for tool in request.forced_tools]
            parallel = request.parallel_tool_calls and request.tool_choice == "required"
            return partial(grammars.lark, self.template.tool_format.forced_grammar(tools, parallel), "tools")
        shape = request.response_format
        if shape is not None and shape.type == "json_object":
            return partial(grammars.json_schema, {"type": "object"}, "response_format")
        if shape is not None and shape.type == "json_schema":
            return partial(grammars.json_schema, shape.json_schema.json_schema, "response_format")
        constraints = request.output_constraints()
        if not constraints:
            return None
        kind, field_name, value = constraints[0]  # the request's validator lets through one at most
        if kind == "json":
            return partial(grammars.json_schema, json_value(value, field_name), field_name)
        compile_kind = {"regex": grammars.regex, "choice": grammars.choice, "grammar": grammars.lark}[kind]
        return partial(compile_kind, value, field_name)

    def start(self, request: SamplingRequest, prompts: list[Prompt], request_id: str, per_prompt: int,
              grammar: CompiledGrammar | None = None) -> list[Choice]:
        """Queue `per_prompt` sequences per prompt (sharing its prefill); all or none are queued."""
        if per_prompt > self.engine.scheduler.max_running:
            raise APIError(400, f"at most {self.engine.scheduler.max_running} choices per prompt can run together "
                                f"on this server", param="best_of" if per_prompt > request.n else "n")
        adapter = self.adapter(request.model)  # here again: it may have been unloaded since the request arrived
        params = [self.sampling_params(request, len(prompt.ids), grammar) for prompt in prompts]
        choices: list[Choice] = []
        try:
            for (ids, text, images), param in zip(prompts, params):
                # an encoder-decoder's prompt is its encoder's input; its decoder starts from its own prompt
                engine_prompt, inputs = (self.decoder_prompt, TextInput(ids)) if self.encoder_decoder else (ids, images)
                for seq in self.engine.add_siblings(engine_prompt, param, per_prompt, request_id, inputs,
                                                    user=request.user or "", adapter=adapter):
                    choices.append(Choice(len(choices), ids, text, seq))
        except QueueFullError as error:
            self.cancel(choices)
            raise server_busy(error) from None
        return choices

    def cancel(self, choices: list[Choice]) -> None:
        for choice in choices:
            self.engine.cancel(choice.seq)

    def sampling_params(self, request: SamplingRequest, prompt_tokens: int,
                        grammar: CompiledGrammar | None = None) -> SamplingParams:
        if prompt_tokens == 0:
            raise APIError(400, "the prompt is empty", param="prompt")
        request = self.with_sampling_defaults(request)
        limit = request.completion_limit
        param = "messages" if isinstance(request, ChatCompletionRequest) else "prompt"
        room = self._encoder_decoder_room(request, prompt_tokens, limit, param) if self.encoder_decoder \
            else self._decoder_room(prompt_tokens, limit, param)
        calls_tools = isinstance(request, ChatCompletionRequest) and bool(request.callable_tools)
        self.check_token_ids(request.logit_bias or {}, "logit_bias")
        self.check_token_ids(request.stop_token_ids or [], "stop_token_ids")
        self._check_logprobs(request)
        # completions' max_tokens defaults to 16, as OpenAI's and vLLM's do: a limit the model's defaults leave alone
        max_tokens = limit or min(room, self.sampling_defaults.get("max_tokens", room))
        return SamplingParams(
            max_tokens=max_tokens, temperature=request.temperature, top_p=request.top_p, top_k=request.top_k,
            min_p=request.min_p, presence_penalty=request.presence_penalty,
            frequency_penalty=request.frequency_penalty, repetition_penalty=request.repetition_penalty,
            logit_bias=tuple((request.logit_bias or {}).items()),
            seed=self.default_seed if request.seed is None else request.seed, stop=request.stop_strings,
            stop_token_ids=tuple(request.stop_token_ids or ()), ignore_eos=request.ignore_eos,
            min_tokens=min(request.min_tokens, max_tokens), logprobs=request.top_logprob_count,
            prompt_logprobs=isinstance(request, CompletionRequest) and request.echo and request.logprobs is not None,
            grammar=grammar, shown_special_tokens=self.template.tool_marker_tokens if calls_tools else (),
            speculative=request.speculative)

    def with_sampling_defaults(self, request: SamplingRequest) -> SamplingRequest:
        """The request with the model's sampling defaults in the fields it left unset (max_tokens aside: a default
        limit only caps the room a request without one gets)."""
        unset = {name: value for name, value in self.sampling_defaults.items()
                 if name != "max_tokens" and name not in request.model_fields_set}
        return request.model_copy(update=unset) if unset else request

    def _decoder_room(self, prompt_tokens: int, limit: int | None, param: str) -> int:
        """How many tokens may follow the prompt in the model's context and the KV memory."""
        asked = f"{prompt_tokens} prompt tokens" + (f" plus {limit} completion tokens" if limit is not None else "")
        room = self.context_length - prompt_tokens
        if room < 1 or (limit is not None and limit > room):
            raise APIError(400, f"This model's maximum context length is {self.context_length} tokens. "
                                f"However, you requested {asked}.", param=param, code="context_length_exceeded")
        kv_tokens = self.engine.max_sequence_tokens
        if prompt_tokens + (limit or 1) > kv_tokens:
            raise APIError(400, f"This server's KV memory holds at most {kv_tokens} tokens for one request "
                                f"(--kv-cache-memory). However, you requested {asked}.", param=param,
                           code="context_length_exceeded")
        return min(room, kv_tokens - prompt_tokens)

    def _encoder_decoder_room(self, request: SamplingRequest, prompt_tokens: int, limit: int | None,
                              param: str) -> int:
        """How many tokens the decoder may write; the prompt must fit the encoder."""
        if prompt_tokens > self.encoder_length:
            raise APIError(400, f"This server's encoder reads at most {self.encoder_length} tokens "
                                f"(--static-cache-encoder-max-length). However, your prompt has {prompt_tokens} "
                                "tokens.", param=param, code="context_length_exceeded")
        room = self.context_length - len(self.decoder_prompt)
        if limit is not None and limit > room:
            raise APIError(400, f"This server's decoder writes at most {room} tokens "
                                f"(--static-cache-decoder-max-length). However, you requested {limit} completion "
                                "tokens.", param="max_tokens", code="context_length_exceeded")
        if isinstance(request, CompletionRequest) and request.echo:
            raise APIError(400, "echo is for decoder models: an encoder-decoder model's prompt is its encoder's "
                                "input, which it neither continues nor scores", param="echo")
        return room

    def check_token_ids(self, token_ids, param: str) -> None:
        vocab = len(self.tokenizer)
        bad = [t for t in token_ids if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"token id {bad[0]} is outside the vocabulary [0, {vocab})", param=param)

    def _check_logprobs(self, request: SamplingRequest) -> None:
        limit = request.OPENAI_MAX_LOGPROBS if self.max_logprobs is None else self.max_logprobs
        if (request.top_logprob_count or 0) > limit:
            raise APIError(400, f"{request.LOGPROBS_FIELD} may be at most {limit} on this server (--max-logprobs)",
                           param=request.LOGPROBS_FIELD)

    async def collect(self, choices: list[Choice], disconnected: Callable[[], Awaitable[bool]]) -> None:
        """Wait for every choice to finish; if the client goes away or time runs out, cancel them all."""
        async def drain(choice: Choice) -> None:
            async for delta in self.engine.stream(choice.seq):
                check_error(delta)
                choice.record(delta)
            self._finished(choice)

        try:
            await finish_unless_abandoned(asyncio.gather(*(drain(c) for c in choices)), disconnected,
                                          self.request_timeout)
        finally:
            self.cancel(choices)

    async def deltas(self, choices: list[Choice]) -> AsyncIterator[tuple[Choice, Delta]]:
        """Deltas of all choices as they arrive, merged; closing the iterator cancels every choice. The request
        timeout is one timer that puts None in the queue (a wait_for per token cost a task and a timer each)."""
        queue: asyncio.Queue[tuple[Choice, Delta] | None] = asyncio.Queue()

        async def pump(choice: Choice) -> None:
            async for delta in self.engine.stream(choice.seq):
                queue.put_nowait((choice, delta))

        pumps = [asyncio.create_task(pump(c)) for c in choices]
        timer = (asyncio.get_running_loop().call_later(self.request_timeout, queue.put_nowait, None)
                 if self.request_timeout else None)
        unfinished = len(choices)
        try:
            while unfinished:
                arrived = await queue.get()
                if arrived is None:
                    raise timeout_error(self.request_timeout)
                choice, delta = arrived
                check_error(delta)
                choice.record(delta)
                if delta.finish_reason is not None:
                    unfinished -= 1
                    self._finished(choice)
                yield choice, delta
        finally:
            if timer:
                timer.cancel()
            for task in pumps:
                task.cancel()
            self.cancel(choices)

    def _finished(self, choice: Choice) -> None:
        seq = choice.seq
        times = choice.token_times
        ttft = times[0] - choice.started if times else None
        rate = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 and times[-1] > times[0] else None
        logger.info("request %s choice %d: %s after %d prompt (%d cached) + %d completion tokens, first token "
                    "after %s, %s", seq.request_id, choice.index, seq.finish_reason, len(choice.prompt_ids),
                    seq.cached_tokens, len(seq.output_ids), f"{ttft:.3f} s" if ttft is not None else "-",
                    f"{rate:.1f} tokens/s" if rate else "-", extra={
                        "request_id": seq.request_id, "choice": choice.index, "finish_reason": seq.finish_reason,
                        "prompt_tokens": len(choice.prompt_ids), "cached_tokens": seq.cached_tokens,
                        "completion_tokens": len(seq.output_ids), "ttft_s": ttft, "tokens_per_s": rate})
        if self.metrics:
            first_sibling = choice.seq.prefix_source is None  # siblings share one prompt: it counts once
            self.metrics.choice_finished(len(choice.prompt_ids) if first_sibling else 0,
                                         choice.seq.cached_tokens if first_sibling else 0, choice.started,
                                         choice.token_times, len(choice.seq.output_ids), seq.finish_reason or "abort")

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


async def start_chat_service(config: Config, progress: StartupProgress) -> TextService:
    loaded, engine = await started_engine(config, progress, load_model, build_engine)
    local_root = Path(config.allowed_local_media_path) if config.allowed_local_media_path else None
    limits = ImageLimits(int(config.max_image_mb * 1e6), config.max_image_pixels, config.allow_remote_images,
                         config.image_fetch_timeout, local_root)
    options = ServingOptions(config.served_names(loaded.name), config.request_timeout or None,
                             config.reasoning_parser, config.tool_call_parser, limits, config.seed, config.max_logprobs,
                             config.chat_template_text(), sampling_defaults(config, loaded.model))
    if options.sampling_defaults:
        logger.info("sampling defaults for the fields a request leaves unset: %s", options.sampling_defaults)
    progress.enter("preparing the tokenizer's grammars and templates")
    service = await on_torch_thread(TextService, engine, loaded, options)
    service.background_compile = start_background_compile(loaded, engine, config)
    served = [*options.served_names, *(adapter.name for adapter in service.lora_adapters())]
    logger.info("serving %s on http://%s:%d", ", ".join(served), config.host, config.port)
    return service


def checked_defaults(defaults: Mapping[str, float]) -> dict[str, Any]:
    """Sampling defaults that a request could give itself: a model's generation config may hold values no request
    may (a top_p of 0), which would fail every request that leaves the field unset."""
    try:
        ChatCompletionRequest(model="-", messages=[{"role": "user", "content": "-"}], **defaults)
    except ValueError as error:
        raise ValueError(f"the sampling defaults {dict(defaults)} (--generation-config, --override-generation-config) "
                         f"are not valid request values: {error}") from None
    return dict(defaults)


def json_value(value: dict | str, param: str) -> dict:
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except ValueError as error:
        raise APIError(400, f"{param} is not valid JSON: {error}", param=param) from None


def usage(choices: list[Choice]) -> Usage:
    """Each prompt counts once, however many choices share it; cached: prompt tokens the prefix cache served."""
    prompts, cached = {}, {}
    for choice in choices:
        prompts[id(choice.prompt_ids)] = len(choice.prompt_ids)
        cached[id(choice.prompt_ids)] = max(cached.get(id(choice.prompt_ids), 0), choice.seq.cached_tokens)
    prompt = sum(prompts.values())
    completion = sum(c.completion_tokens for c in choices)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                 prompt_tokens_details=PromptTokensDetails(cached_tokens=sum(cached.values())))


