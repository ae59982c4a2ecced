"""/v1/chat/completions on the engine: messages to a prompt through the chat template, the engine's text
to messages and chunks (with reasoning split off)."""

from __future__ import annotations

from typing import AsyncIterator

from models import (AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletion, ChatCompletionChunk,
                    ChatCompletionRequest, ChatDelta, R1Settings, Usage)
from serving.errors import APIError
from serving.generator import Choice, Generator, usage
from serving.reasoning import ReasoningParser, Split, add_math_instruction, apply_few_shot_mode, boxed_answer


def chat_prompt(generator: Generator, request: ChatCompletionRequest) -> list[int]:
    if not generator.tokenizer.chat_template:
        raise APIError(400, "this model has no chat template; use /v1/completions", param="messages")
    messages = [{"role": m.role, "content": m.text()} for m in request.messages]
    if request.r1_settings:
        messages = apply_few_shot_mode(messages, request.r1_settings.few_shot_mode)
        if request.r1_settings.math_mode:
            messages = add_math_instruction(messages)
    try:
        text = generator.render(messages)
    except Exception as error:  # templates raise their own errors for dialogues they reject
        raise APIError(400, f"the chat template rejected these messages: {error}", param="messages") from None
    return generator.tokenizer(text, add_special_tokens=False).input_ids


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
