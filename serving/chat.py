"""/v1/chat/completions on the engine: messages (and tools) to a prompt through the chat template, the
engine's text to messages and chunks, with reasoning and tool calls split off."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import AsyncIterator

from PIL.Image import Image

from batching.torch_thread import on_torch_thread
from models import (AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletion, ChatCompletionChunk,
                    ChatCompletionRequest, ChatDelta, ChatMessage, FunctionCall, FunctionCallDelta, ImagePart,
                    R1Settings, ToolCall, ToolCallDelta, Usage)
from serving.errors import APIError
from serving.images import ImageError, load_image
from serving.reasoning import Split, add_math_instruction, apply_few_shot_mode, boxed_answer
from serving.template import ChatTemplate, PromptEnding
from serving.text_service import Choice, Prompt, TextService, usage
from serving.tool_parsers import ArgumentsAdded, CallStarted, Event, ToolCallParser, ToolFormat, tools_system_prompt


async def chat_prompt(service: TextService, request: ChatCompletionRequest, ending: PromptEnding = PromptEnding()
                      ) -> list[Prompt]:
    """The chat as the model's prompt: rendered by its chat template, its images (if the model reads them) fetched
    and prepared by its processor, off the event loop."""
    template = service.template
    if not template.renders_chats:
        raise APIError(400, "this model has no chat template; use /v1/completions", param="messages")
    images = {(index, part): message.content[part] for index, message in enumerate(request.messages)
              for part in message.image_parts()}
    if images and not template.reads_images:
        index, part = next(iter(images))
        raise APIError(400, f"{service.model_name} reads text only: messages[{index}].content[{part}] is an image",
                       param=f"messages[{index}].content[{part}]")
    text = render_chat(template, request, ending)
    if not images:
        return [Prompt(template.prompt_ids(text, ending))]
    loaded = await asyncio.gather(*(fetched_image(service, part.image_url.url, where)
                                    for where, part in images.items()))
    try:
        processed = await on_torch_thread(template.process, text, loaded, ending)
    except ValueError as error:  # e.g. a chat template that drops image parts
        raise APIError(400, f"the model's processor rejected these images: {error}", param="messages") from None
    return [Prompt(processed["input_ids"][0].tolist(), images=template.image_inputs(processed))]


async def fetched_image(service: TextService, url: str, where: tuple[int, int]) -> Image:
    try:
        return await load_image(url, service.image_limits)
    except ImageError as error:
        param = f"messages[{where[0]}].content[{where[1]}]"
        raise APIError(400, f"{param}: {error}", param=param) from None


def render_chat(template: ChatTemplate, request: ChatCompletionRequest, ending: PromptEnding = PromptEnding()) -> str:
    tools = [tool.function.model_dump(exclude_none=True) for tool in request.callable_tools]
    with_images = template.reads_images
    if template.renders_tools:
        messages = [template_message(m, with_images) for m in request.messages]
    else:
        fmt = template.tool_format
        messages = described_tools(tools, [plain_message(m, fmt, with_images) for m in request.messages], fmt)
        tools = []
    if request.r1_settings:
        messages = apply_few_shot_mode(messages, request.r1_settings.few_shot_mode)
        if request.r1_settings.math_mode:
            messages = add_math_instruction(messages)
    try:
        return template.render(messages, [{"type": "function", "function": tool} for tool in tools], ending,
                               request.chat_template_kwargs)
    except Exception as error:  # templates raise their own errors for dialogues they reject
        raise APIError(400, f"the chat template rejected these messages: {error}", param="messages") from None


def template_message(message: ChatMessage, with_images: bool = False) -> dict:
    """A message as chat templates expect it: call arguments as objects; for a vision-language model's template,
    a message with images as its text and image parts in order."""
    rendered = {"role": message.role, "content": content_parts(message) if with_images else message.text()}
    if message.tool_calls:
        rendered["tool_calls"] = [{"id": call.id, "type": "function", "function": {
            "name": call.function.name, "arguments": parsed_arguments(call.function.arguments)}}
            for call in message.tool_calls]
    if message.tool_call_id:
        rendered["tool_call_id"] = message.tool_call_id
    if message.name:
        rendered["name"] = message.name
    return rendered


def plain_message(message: ChatMessage, fmt: ToolFormat, with_images: bool = False) -> dict:
    """A message for a template that knows nothing of tools: calls written out, results as user turns (for a
    vision-language template, as parts)."""
    if message.role == "tool":
        text = f"<tool_response>\n{message.text()}\n</tool_response>"
        return {"role": "user", "content": [{"type": "text", "text": text}] if with_images else text}
    calls = [fmt.call_text(c.function.name, parsed_arguments(c.function.arguments)) for c in message.tool_calls or []]
    if with_images:
        return {"role": message.role, "content": [*content_parts(message),
                                                  *([{"type": "text", "text": "\n".join(calls)}] if calls else [])]}
    content = "\n".join([message.text(), *calls]) if message.text() else "\n".join(calls)
    return {"role": message.role, "content": content}


def content_parts(message: ChatMessage) -> list[dict]:
    """A message's text and image parts in order, as vision-language chat templates take them (text alone too:
    their templates iterate over parts)."""
    if not isinstance(message.content, list):
        return [{"type": "text", "text": message.content}] if message.content else []
    return [{"type": "image"} if isinstance(part, ImagePart) else {"type": "text", "text": part.text}
            for part in message.content]


def described_tools(tools: list[dict], messages: list[dict], fmt: ToolFormat) -> list[dict]:
    if not tools:
        return messages
    prompt = tools_system_prompt(tools, fmt)
    if messages[0]["role"] in ("system", "developer"):
        return [{**messages[0], "content": messages[0]["content"] + "\n\n" + prompt}, *messages[1:]]
    return [{"role": "system", "content": prompt}, *messages]


def parsed_arguments(arguments: str) -> dict | str:
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments


@dataclass
class ChatPiece:
    reasoning: str = ""
    content: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)


class ChatOutput:
    """Turns a choice's text into content, reasoning_content and tool calls, in one go or delta by delta."""

    def __init__(self, template: ChatTemplate, request: ChatCompletionRequest) -> None:
        self.parser = template.reasoning_parser(request.chat_template_kwargs)
        self.settings = request.r1_settings or R1Settings()
        self.tools = ToolCallParser(template.tool_format, {t.function.name for t in request.callable_tools},
                                    request.parallel_tool_calls) if request.callable_tools else None
        self.content: list[str] = []

    def feed(self, text: str, last: bool = False) -> ChatPiece:
        """What `text` releases; when it is the `last` text, also everything still held back."""
        split = self.parser.feed(text) if self.parser else Split(content=text)
        if last and self.parser:
            tail = self.parser.finish()
            split = Split(split.reasoning + tail.reasoning, split.content + tail.content)
        split = self._shape(split)
        if last and self.settings.math_mode:
            content = "".join(self.content)
            split.content = boxed_answer(content) or content
        return self._piece(split, last)

    @property
    def called(self) -> bool:
        return bool(self.tools and self.tools.started)

    def _shape(self, split: Split) -> Split:
        if not self.settings.return_think_data:
            split.reasoning = ""
        if self.settings.math_mode:  # only the boxed answer is returned, so content waits for the end
            self.content.append(split.content)
            split.content = ""
        return split

    def _piece(self, split: Split, last: bool) -> ChatPiece:
        if not self.tools:
            return ChatPiece(split.reasoning, split.content)
        events = self.tools.feed(split.content) + (self.tools.finish() if last else [])
        return ChatPiece(split.reasoning, "".join(e for e in events if isinstance(e, str)), call_deltas(events))


def call_deltas(events: list[Event]) -> list[ToolCallDelta]:
    """Tool-call events as OpenAI deltas, one per call: id and name first, then arguments."""
    deltas: dict[int, ToolCallDelta] = {}
    for event in events:
        if isinstance(event, CallStarted):
            deltas[event.index] = ToolCallDelta(index=event.index, id=event.id, type="function",
                                                function=FunctionCallDelta(name=event.name))
        elif isinstance(event, ArgumentsAdded):
            delta = deltas.setdefault(event.index, ToolCallDelta(index=event.index, function=FunctionCallDelta()))
            delta.function.arguments += event.text
    return list(deltas.values())


def finish_reason(reason: str | None, called: bool) -> str | None:
    return "tool_calls" if reason == "stop" and called else reason


def whole_message(template: ChatTemplate, request: ChatCompletionRequest, choice: Choice
                  ) -> tuple[AssistantMessage, str | None]:
    """A finished choice's message and finish reason (a malformed tool call makes the whole reply content)."""
    output = ChatOutput(template, request)
    piece = output.feed("".join(choice.text), last=True)
    reasoning, content, calls = piece.reasoning, piece.content, whole_calls(piece.tool_calls)
    if output.tools and not all(call.valid for call in output.tools.started):
        content, calls = output.tools.text, []
    message = AssistantMessage(content=content or (None if calls else ""), tool_calls=calls or None,
                               reasoning_content=reasoning if output.parser and reasoning else None)
    return message, finish_reason(choice.seq.finish_reason, bool(calls))


def chat_response(service: TextService, request: ChatCompletionRequest, request_id: str,
                  choices: list[Choice]) -> ChatCompletion:
    def choice_body(choice: Choice) -> ChatChoice:
        message, reason = whole_message(service.template, request, choice)
        return ChatChoice(index=choice.index, message=message, finish_reason=reason,
                          logprobs=service.chat_logprobs(choice.logprobs) if request.logprobs else None)

    return ChatCompletion(id=request_id, model=request.model, usage=usage(choices),
                          choices=[choice_body(c) for c in choices])


def whole_calls(deltas: list[ToolCallDelta]) -> list[ToolCall]:
    calls: dict[int, ToolCall] = {}
    for delta in deltas:
        call = calls.setdefault(delta.index, ToolCall(id=delta.id or "", function=FunctionCall(
            name=delta.function.name or "", arguments="")))
        call.function.arguments += delta.function.arguments
    return list(calls.values())


async def chat_chunks(service: TextService, request: ChatCompletionRequest, choices: list[Choice],
                      request_id: str) -> AsyncIterator[ChatCompletionChunk]:
    def chunk(*chunk_choices: ChatChunkChoice, usage_: Usage | None = None) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=request_id, model=request.model, choices=list(chunk_choices), usage=usage_)

    outputs = {c.index: ChatOutput(service.template, request) for c in choices}
    for choice in choices:
        yield chunk(ChatChunkChoice(index=choice.index, delta=ChatDelta(role="assistant", content="")))
    async for choice, delta in service.deltas(choices):
        output = outputs[choice.index]
        piece = output.feed(delta.text, last=delta.finish_reason is not None)
        logprobs = service.chat_logprobs(delta.logprobs) if request.logprobs else None
        if piece.reasoning or piece.content or piece.tool_calls or logprobs:
            yield chunk(ChatChunkChoice(index=choice.index, logprobs=logprobs, delta=ChatDelta(
                content=piece.content or None, reasoning_content=piece.reasoning or None,
                tool_calls=piece.tool_calls or None)))
        if delta.finish_reason:
            yield chunk(ChatChunkChoice(index=choice.index, delta=ChatDelta(),
                                        finish_reason=finish_reason(delta.finish_reason, output.called)))
    if request.include_usage:
        yield chunk(usage_=usage(choices))
