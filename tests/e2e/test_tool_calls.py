"""Tool calling with the embedded 135M model (whose template ignores tools: the prompt describes them,
Hermes style) and the real openai SDK: forced calls always valid, streamed in OpenAI's shape, and a
two-turn round trip."""

import json
from typing import Literal

import jsonschema
import openai
import pytest
from openai import pydantic_function_tool
from pydantic import BaseModel, Field

from serving.tool_parsers import ToolCallParser
from serving.tool_parsers.formats import HERMES

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "description": "The time in a time zone",
                                         "parameters": {"type": "object", "properties": {
                                             "zone": {"type": "string", "maxLength": 30}},
                                             "required": ["zone"], "additionalProperties": False}}}
PARAMETERS = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}
ASK = [{"role": "user", "content": "What is the weather in Paris, and what time is it there?"}]


def model(client):
    return client.models.list().data[0].id


def check_calls(calls, names=None):
    assert calls
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        assert names is None or call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), PARAMETERS[call.function.name])


@pytest.mark.parametrize("parallel", [True, False])
def test_required_tool_choice_always_returns_valid_calls(client, parallel):
    reply = client.chat.completions.create(model=model(client), messages=ASK, tools=[WEATHER, TIME], n=3,
                                           temperature=1.0, seed=3, tool_choice="required", max_tokens=300,
                                           parallel_tool_calls=parallel)
    for choice in reply.choices:
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        check_calls(choice.message.tool_calls)
        assert parallel or len(choice.message.tool_calls) == 1


def test_a_named_tool_choice_calls_that_tool(client):
    reply = client.chat.completions.create(model=model(client), messages=ASK, tools=[WEATHER, TIME], max_tokens=200,
                                           tool_choice={"type": "function", "function": {"name": "get_time"}})
    calls = reply.choices[0].message.tool_calls
    check_calls(calls, {"get_time"})
    assert len(calls) == 1


def test_streamed_calls_come_name_first_then_argument_fragments(client):
    stream = client.chat.completions.create(model=model(client), messages=ASK, tools=[WEATHER, TIME], stream=True,
                                            tool_choice="required", parallel_tool_calls=False, max_tokens=300)
    pieces, reasons = [], []
    for chunk in stream:
        choice = chunk.choices[0]
        assert not choice.delta.content, "tool-call text leaked into content"
        pieces += choice.delta.tool_calls or []
        reasons.append(choice.finish_reason)
    assert reasons[-1] == "tool_calls"
    first = {}
    for piece in pieces:
        if piece.index not in first:
            first[piece.index] = piece
            assert piece.id and piece.type == "function" and piece.function.name
        else:
            assert piece.id is None and piece.function.name is None
    arguments = {i: "".join(p.function.arguments or "" for p in pieces if p.index == i) for i in first}
    assert sum(1 for p in pieces if p.function.arguments) > len(first), "arguments arrived in one piece"
    for index, piece in first.items():
        jsonschema.validate(json.loads(arguments[index]), PARAMETERS[piece.function.name])


class GetWeather(BaseModel):
    city: str = Field(max_length=40)
    unit: Literal["celsius", "fahrenheit"]


def test_sdk_stream_helper_assembles_parsed_tool_calls(client):
    tools = [pydantic_function_tool(GetWeather)]
    with client.beta.chat.completions.stream(model=model(client), messages=ASK, tools=tools, tool_choice="required",
                                             parallel_tool_calls=False, max_tokens=200, temperature=0) as stream:
        events = [event.type for event in stream]
        final = stream.get_final_completion()
    call = final.choices[0].message.tool_calls[0]
    assert "tool_calls.function.arguments.delta" in events and isinstance(call.function.parsed_arguments, GetWeather)


def test_a_two_turn_tool_round_trip(client):
    first = client.chat.completions.create(model=model(client), messages=ASK, tools=[WEATHER], max_tokens=200,
                                           tool_choice="required", parallel_tool_calls=False)
    call = first.choices[0].message.tool_calls[0]
    dialogue = ASK + [first.choices[0].message.model_dump(exclude_none=True),
                      {"role": "tool", "tool_call_id": call.id, "content": "18 degrees, light rain"}]
    second = client.chat.completions.create(model=model(client), messages=dialogue, tools=[WEATHER], max_tokens=30,
                                            tool_choice="none")
    assert second.choices[0].message.content and not second.choices[0].message.tool_calls
    question_only = client.chat.completions.create(model=model(client), messages=ASK, tools=[WEATHER], max_tokens=1,
                                                   tool_choice="none")
    assert second.usage.prompt_tokens > question_only.usage.prompt_tokens + 20  # the call and result were rendered


def test_a_call_cut_short_falls_back_to_content(client):
    reply = client.chat.completions.create(model=model(client), messages=ASK, tools=[WEATHER], max_tokens=8,
                                           tool_choice="required")
    choice = reply.choices[0]
    assert choice.finish_reason == "length" and not choice.message.tool_calls
    assert choice.message.content.startswith("<tool_call>")


@pytest.mark.parametrize("seed", range(4))
def test_auto_mode_answers_with_content_or_valid_calls(client, seed):
    """Markup stays in content only when it is no valid call (an unknown tool, bad JSON): the documented
    fallback, which a free-running small model does meet."""
    reply = client.chat.completions.create(model=model(client), messages=ASK, tools=[WEATHER, TIME], max_tokens=120,
                                           seed=seed)
    choice = reply.choices[0]
    if choice.message.tool_calls:
        assert choice.finish_reason == "tool_calls"
        check_calls(choice.message.tool_calls)
    else:
        parser = ToolCallParser(HERMES, set(PARAMETERS))
        parser.feed(choice.message.content)
        parser.finish()
        assert not (parser.started and all(call.valid for call in parser.started)), choice.message.content


@pytest.mark.parametrize("kwargs, param", [
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": [WEATHER, WEATHER]}, "tools"),
    ({"tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
    ({"tool_choice": "required", "tools": [{"type": "function", "function": {
        "name": "f", "parameters": {"type": "array", "uniqueItems": True}}}]}, "tools"),
])
def test_bad_tool_requests_name_their_field(client, kwargs, param):
    body = {"tools": [WEATHER], **kwargs}
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model=model(client), messages=ASK, max_tokens=5, **body)
    assert error.value.body["param"] == param
