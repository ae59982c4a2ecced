"""/v1/responses on the chat path: a Responses request becomes the chat request it means (instructions,
earlier turns, tools, text.format), runs on the same engine path, and its reply comes back as output items,
whole or as typed stream events. Stored responses let `previous_response_id` continue a conversation."""

from __future__ import annotations

import itertools
from collections import OrderedDict
from dataclasses import dataclass
from typing import AsyncIterator, Callable

from pydantic import BaseModel, ValidationError

from models import (AssistantMessage, ChatCompletionRequest, ChatMessage, ErrorBody, FunctionCall, FunctionCallDelta,
                    IncompleteDetails, InputTokensDetails, NamedFunction, OutputFunctionCall, OutputItem,
                    OutputMessage, OutputReasoning, OutputText, OutputTokensDetails, ReasoningText, ResponseEvent,
                    ResponseObject, ResponsesRequest, ResponseUsage, TextConfig, ToolCall, ToolCallDelta)
from serving.chat import ChatOutput, ChatPiece, finish_reason, whole_message
from serving.errors import APIError
from serving.text_service import Choice, TextService, usage


CHAT_TO_RESPONSES_FIELDS = {"messages": "input", "response_format": "text",
                            "max_completion_tokens": "max_output_tokens"}


@dataclass
class Turn:
    request: ResponsesRequest
    chat: ChatCompletionRequest  # what runs on the engine
    history: list[ChatMessage]  # the conversation it continues
    said: list[ChatMessage]  # what this request adds to it


@dataclass
class StoredResponse:
    response: ResponseObject
    conversation: list[ChatMessage]  # every turn so far, this response's included; instructions are not kept


class ResponseStore:
    """The most recently used `capacity` responses, in this process (replicas need sticky routing)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.responses: OrderedDict[str, StoredResponse] = OrderedDict()

    def put(self, stored: StoredResponse) -> None:
        if self.capacity <= 0:
            return
        self.responses[stored.response.id] = stored
        self.responses.move_to_end(stored.response.id)
        while len(self.responses) > self.capacity:
            self.responses.popitem(last=False)

    def get(self, response_id: str) -> StoredResponse:
        if response_id not in self.responses:
            raise APIError(404, f"No response found with id '{response_id}'.", param="response_id",
                           code="not_found")
        self.responses.move_to_end(response_id)
        return self.responses[response_id]

    def delete(self, response_id: str) -> None:
        self.get(response_id)
        del self.responses[response_id]


def chat_request(request: ResponsesRequest, messages: list[ChatMessage]) -> ChatCompletionRequest:
    """The chat request this Responses request means: one generation path for both endpoints."""
    instructions = [ChatMessage(role="system", content=request.instructions)] if request.instructions else []
    shape = request.text.format if request.text else None
    try:
        return ChatCompletionRequest(
            model=request.model, messages=instructions + messages,
            max_completion_tokens=request.max_output_tokens,
            **request.model_dump(include={"temperature", "top_p"} & request.model_fields_set),  # else the model's
            parallel_tool_calls=request.parallel_tool_calls, user=request.user, metadata=request.metadata,
            stream=request.stream,
            tools=[{"type": "function", "function": tool.model_dump(exclude={"type"}, exclude_none=True)}
                   for tool in request.tools or []],
            tool_choice=({"type": "function", "function": {"name": request.tool_choice.name}}
                         if isinstance(request.tool_choice, NamedFunction) else request.tool_choice),
            response_format=None if shape is None or shape.type == "text" else {
                "type": shape.type, "json_schema": {"name": shape.name or "output", "schema": shape.json_schema,
                                                    "strict": shape.strict}} if shape.type == "json_schema" else
            {"type": shape.type})
    except ValidationError as error:  # named as the Responses request names the field
        first = error.errors()[0]
        field = str(first["loc"][0]) if first["loc"] else None
        raise APIError(400, str(first["msg"]).removeprefix("Value error, "),
                       param=CHAT_TO_RESPONSES_FIELDS.get(field, field)) from None


def input_messages(request: ResponsesRequest) -> list[ChatMessage]:
    if isinstance(request.input, str):
        return [ChatMessage(role="user", content=request.input)]
    messages: list[ChatMessage] = []
    for item in request.input:
        if item.type == "message":
            messages.append(ChatMessage(role=item.role, content=item.chat_content()))
        elif item.type == "function_call":
            call = ToolCall(id=item.call_id, function=FunctionCall(name=item.name, arguments=item.arguments))
            if messages and messages[-1].role == "assistant" and messages[-1].tool_calls is not None:
                messages[-1].tool_calls.append(call)
            else:
                messages.append(ChatMessage(role="assistant", content=None, tool_calls=[call]))
        elif item.type == "function_call_output":
            messages.append(ChatMessage(role="tool", tool_call_id=item.call_id, content=item.text()))
    return messages


def reply_message(items: list[OutputItem]) -> ChatMessage:
    """A response's output as the assistant turn a later request replays."""
    text = "".join(part.text for item in items if isinstance(item, OutputMessage) for part in item.content)
    calls = [ToolCall(id=item.call_id, function=FunctionCall(name=item.name, arguments=item.arguments))
             for item in items if isinstance(item, OutputFunctionCall)]
    return ChatMessage(role="assistant", content=text or None, tool_calls=calls or None)


class OutputItems:
    """Output items built from a reply's pieces, each change also told as a typed stream event."""

    def __init__(self, sequence: Callable[[], int]) -> None:
        self.sequence = sequence
        self.items: list[OutputItem] = []
        self.calls: dict[int, OutputFunctionCall] = {}  # by the tool-call index chat deltas carry

    def event(self, type_: str, **fields) -> ResponseEvent:
        """Models among the fields are sent as they are at this moment, in their wire names."""
        fields = {key: value.model_dump(by_alias=True) if isinstance(value, BaseModel) else value
                  for key, value in fields.items()}
        return ResponseEvent(type=type_, sequence_number=self.sequence(), **fields)

    def add(self, piece: ChatPiece) -> list[ResponseEvent]:
        events: list[ResponseEvent] = []
        if piece.reasoning:
            events += self._text(OutputReasoning, ReasoningText, "response.reasoning_text.delta", piece.reasoning)
        if piece.content:
            events += self._text(OutputMessage, OutputText, "response.output_text.delta", piece.content)
        for delta in piece.tool_calls:
            if delta.id:
                events += self._open(OutputFunctionCall(call_id=delta.id, name=delta.function.name or ""))
                self.calls[delta.index] = self.items[-1]
            call = self.calls[delta.index]
            if delta.function.arguments:
                call.arguments += delta.function.arguments
                events.append(self.event("response.function_call_arguments.delta", item_id=call.id,
                                         output_index=self.items.index(call), delta=delta.function.arguments))
        return events

    def close(self, status: str) -> list[ResponseEvent]:
        return self._close_last(status)

    def _text(self, item_type, part_type, delta_type: str, text: str) -> list[ResponseEvent]:
        events = []
        if not self.items or not isinstance(self.items[-1], item_type):
            events += self._open(item_type())
            item = self.items[-1]
            item.content.append(part_type())
            events.append(self.event("response.content_part.added", item_id=item.id, output_index=len(self.items) - 1,
                                     content_index=0, part=item.content[0]))
        item = self.items[-1]
        item.content[0].text += text
        extra = {"logprobs": []} if item_type is OutputMessage else {}
        events.append(self.event(delta_type, item_id=item.id, output_index=len(self.items) - 1, content_index=0,
                                 delta=text, **extra))
        return events

    def _open(self, item: OutputItem) -> list[ResponseEvent]:
        events = self._close_last("completed")
        self.items.append(item)
        events.append(self.event("response.output_item.added", output_index=len(self.items) - 1,
                                 item=item))
        return events

    def _close_last(self, status: str) -> list[ResponseEvent]:
        if not self.items or self.items[-1].status != "in_progress":
            return []
        item, index = self.items[-1], len(self.items) - 1
        events = []
        if isinstance(item, OutputFunctionCall):
            events.append(self.event("response.function_call_arguments.done", item_id=item.id, output_index=index,
                                     name=item.name, arguments=item.arguments))
        else:
            done = "response.output_text.done" if isinstance(item, OutputMessage) else "response.reasoning_text.done"
            extra = {"logprobs": []} if isinstance(item, OutputMessage) else {}
            events.append(self.event(done, item_id=item.id, output_index=index, content_index=0,
                                     text=item.content[0].text, **extra))
            events.append(self.event("response.content_part.done", item_id=item.id, output_index=index,
                                     content_index=0, part=item.content[0]))
        item.status = status
        events.append(self.event("response.output_item.done", output_index=index, item=item))
        return events


class ResponsesService:
    def __init__(self, text_service: TextService, store: ResponseStore) -> None:
        self.text_service = text_service
        self.store = store

    def prepare(self, request: ResponsesRequest) -> Turn:
        history = self.store.get(request.previous_response_id).conversation if request.previous_response_id else []
        said = input_messages(request)
        return Turn(request, chat_request(request, history + said), history, said)

    def whole(self, turn: Turn, choices: list[Choice], response_id: str) -> ResponseObject:
        message, reason = whole_message(self.text_service.template, turn.chat, choices[0])
        builder = OutputItems(itertools.count().__next__)
        builder.add(whole_piece(message))
        builder.close(item_status(reason))
        return self._finish(turn, self._shell(turn.request, response_id), builder.items, choices, reason)

    async def events(self, turn: Turn, choices: list[Choice], response_id: str) -> AsyncIterator[ResponseEvent]:
        builder = OutputItems(itertools.count().__next__)
        response = self._shell(turn.request, response_id)
        yield builder.event("response.created", response=response)
        yield builder.event("response.in_progress", response=response)
        output = ChatOutput(self.text_service.template, turn.chat)
        reason = None
        try:
            async for _, delta in self.text_service.deltas(choices):
                piece = output.feed(delta.text, last=delta.finish_reason is not None)
                if delta.finish_reason:
                    reason = finish_reason(delta.finish_reason, output.called)
                for event in builder.add(piece):
                    yield event
        except APIError as error:
            response.status = "failed"
            response.error = ErrorBody(message=error.message, type=error.type, code=error.code)
            yield builder.event("response.failed", response=response)
            return
        for event in builder.close(item_status(reason)):
            yield event
        response = self._finish(turn, response, builder.items, choices, reason)
        ending = "response.incomplete" if response.status == "incomplete" else "response.completed"
        yield builder.event(ending, response=response)

    def _shell(self, request: ResponsesRequest, response_id: str) -> ResponseObject:
        return ResponseObject(
            id=response_id, model=request.model, instructions=request.instructions,
            max_output_tokens=request.max_output_tokens, parallel_tool_calls=request.parallel_tool_calls,
            previous_response_id=request.previous_response_id,
            temperature=self._sampled_with(request, "temperature"), top_p=self._sampled_with(request, "top_p"),
            tool_choice=request.tool_choice or "auto", tools=request.tools or [],
            text=request.text or TextConfig(), metadata=request.metadata or {}, store=request.store, user=request.user)

    def _sampled_with(self, request: ResponsesRequest, field: str) -> float:
        """The value the reply was sampled with: the request's, or where it gave none, the model's default."""
        if field in request.model_fields_set:
            return getattr(request, field)
        return self.text_service.sampling_defaults.get(field, getattr(request, field))

    def _finish(self, turn: Turn, response: ResponseObject, items: list[OutputItem], choices: list[Choice],
                reason: str | None) -> ResponseObject:
        response.output = items
        response.status = "incomplete" if reason == "length" else "completed"
        if reason == "length":
            response.incomplete_details = IncompleteDetails(reason="max_output_tokens")
        response.usage = self._usage(choices, items)
        if turn.request.store:
            self.store.put(StoredResponse(response, turn.history + turn.said + [reply_message(items)]))
        return response

    def _usage(self, choices: list[Choice], items: list[OutputItem]) -> ResponseUsage:
        counted = usage(choices)
        reasoning = "".join(part.text for item in items if isinstance(item, OutputReasoning) for part in item.content)
        thought = len(self.text_service.tokenizer(reasoning, add_special_tokens=False).input_ids) if reasoning else 0
        return ResponseUsage(
            input_tokens=counted.prompt_tokens, output_tokens=counted.completion_tokens,
            total_tokens=counted.total_tokens,
            output_tokens_details=OutputTokensDetails(reasoning_tokens=min(thought, counted.completion_tokens)),
            input_tokens_details=InputTokensDetails(cached_tokens=counted.prompt_tokens_details.cached_tokens))


def item_status(reason: str | None) -> str:
    return "incomplete" if reason == "length" else "completed"


def whole_piece(message: AssistantMessage) -> ChatPiece:
    """A whole reply as one piece, so it builds the same output items a stream does."""
    return ChatPiece(message.reasoning_content or "", message.content or "", [
        ToolCallDelta(index=index, id=call.id, type="function",
                      function=FunctionCallDelta(name=call.function.name, arguments=call.function.arguments))
        for index, call in enumerate(message.tool_calls or [])])

