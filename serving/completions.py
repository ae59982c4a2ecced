"""/v1/completions on the engine: prompts (text or token ids) in, legacy completion choices and chunks out,
with echo, logprobs and best_of."""

from __future__ import annotations

from typing import AsyncIterator

from models import Completion, CompletionChoice, CompletionRequest, Usage
from serving.errors import APIError
from serving.text_service import Choice, Prompt, TextService, usage


async def completion_prompts(service: TextService, request: CompletionRequest) -> list[Prompt]:
    prompt = request.prompt
    if isinstance(prompt, str):
        prompt = [prompt]
    if all(isinstance(p, int) for p in prompt):
        prompt = [prompt]
    vocab = len(service.tokenizer)
    prompts = []
    for item in prompt:
        if isinstance(item, str):
            prompts.append(Prompt(service.tokenizer(item).input_ids, item))
        elif all(0 <= t < vocab for t in item):
            prompts.append(Prompt(list(item), service.tokenizer.decode(item)))
        else:
            raise APIError(400, f"token ids must lie in [0, {vocab})", param="prompt")
    return prompts


def best_choices(choices: list[Choice], per_prompt: int, keep: int) -> list[Choice]:
    """The `keep` most likely of each prompt's candidates (by cumulative logprob), re-indexed."""
    best = []
    for start in range(0, len(choices), per_prompt):
        candidates = choices[start:start + per_prompt]
        best.extend(sorted(candidates, key=lambda c: c.seq.cumulative_logprob, reverse=True)[:keep])
    for index, choice in enumerate(best):
        choice.index = index
    return best


def completion_response(service: TextService, request: CompletionRequest, request_id: str,
                        choices: list[Choice]) -> Completion:
    shown = best_choices(choices, request.candidates, request.n)

    def choice_body(choice: Choice) -> CompletionChoice:
        prefix = choice.prompt_text if request.echo else ""
        logprobs = None
        if request.logprobs is not None:
            entries = (choice.seq.prompt_logprobs if request.echo else []) + choice.logprobs
            logprobs = service.completion_logprobs(entries, 0)
        return CompletionChoice(index=choice.index, text=prefix + "".join(choice.text),
                                finish_reason=choice.seq.finish_reason, logprobs=logprobs)

    return Completion(id=request_id, model=request.model, usage=usage(choices), choices=[choice_body(c) for c in shown])


async def completion_chunks(service: TextService, request: CompletionRequest, choices: list[Choice],
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
            logprobs = service.completion_logprobs(choice.seq.prompt_logprobs, 0)
        return chunk(CompletionChoice(index=choice.index, text=choice.prompt_text, logprobs=logprobs))

    async for choice, delta in service.deltas(choices):
        if request.echo and choice.index not in echoed:
            yield echo(choice)
        logprobs = None
        if request.logprobs is not None:
            logprobs = service.completion_logprobs(delta.logprobs, offsets[choice.index])
            offsets[choice.index] += sum(len(t) for t in logprobs.tokens)
        if delta.text or delta.finish_reason or logprobs:
            yield chunk(CompletionChoice(index=choice.index, text=delta.text, finish_reason=delta.finish_reason,
                                         logprobs=logprobs))
    if request.include_usage:
        yield chunk(usage_=usage(choices))
