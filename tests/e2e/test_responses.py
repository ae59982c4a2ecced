"""/v1/responses with the embedded model, the real openai SDK and the OpenAI Agents SDK: whole and
streamed responses, tools, structured output, stored conversations and the errors it owes."""

import asyncio
import json

import agents
import jsonschema
import openai
import pytest

from models import ResponseObject
from serving.responses import ResponseStore, StoredResponse

WEATHER = {"type": "function", "name": "get_weather", "description": "The current weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40}},
                          "required": ["city"], "additionalProperties": False}}
STREAM_ORDER = ["response.created", "response.in_progress", "response.output_item.added",
                "response.content_part.added", "response.output_text.delta", "response.output_text.done",
                "response.content_part.done", "response.output_item.done", "response.completed"]


def model(client):
    return client.models.list().data[0].id


def test_a_string_input_gets_a_completed_response(client):
    response = client.responses.create(model=model(client), input="What is the capital of France?",
                                       temperature=0, max_output_tokens=60)
    assert response.id.startswith("resp_") and response.object == "response" and response.status == "completed"
    assert "Paris" in response.output_text
    usage = response.usage
    assert usage.input_tokens > 0 and usage.output_tokens > 0
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    assert client.responses.retrieve(response.id).output_text == response.output_text


def test_instructions_and_message_lists_reach_the_prompt(client):
    messages = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi!"},
                {"role": "user", "content": [{"type": "input_text", "text": "Name a colour."}]}]
    short, longer = [client.responses.create(model=model(client), input=messages, temperature=0, max_output_tokens=20,
                                             instructions=instructions)
                     for instructions in ("You are a painter.", "You are a painter. Answer in one lower-case word.")]
    assert longer.usage.input_tokens > short.usage.input_tokens > 10
    assert longer.instructions.startswith("You are a painter") and longer.output_text


def test_the_stream_comes_in_order_and_matches_the_final_response(client):
    request = dict(model=model(client), input="Say hello.", temperature=0, max_output_tokens=80)
    with client.responses.stream(**request) as stream:
        events = list(stream)
        final = stream.get_final_response()
    kinds = [event.type for event in events]
    assert [kind for i, kind in enumerate(kinds) if i == 0 or kind != kinds[i - 1]] == STREAM_ORDER
    assert [event.sequence_number for event in events] == list(range(len(events)))
    text = "".join(event.delta for event in events if event.type == "response.output_text.delta")
    assert text and final.output_text == text and final.status == "completed"
    assert client.responses.retrieve(final.id).output_text == text


@pytest.mark.parametrize("stream", [False, True])
def test_a_required_function_call_has_valid_arguments(client, stream):
    kwargs = dict(model=model(client), input="What is the weather in Paris?", tools=[WEATHER],
                  tool_choice="required", parallel_tool_calls=False, temperature=0, max_output_tokens=80)
    if stream:
        with client.responses.stream(**kwargs) as events:
            kinds = [event.type for event in events]
            response = events.get_final_response()
        assert "response.function_call_arguments.delta" in kinds and "response.function_call_arguments.done" in kinds
    else:
        response = client.responses.create(**kwargs)
    [call] = response.output
    assert call.type == "function_call" and call.name == "get_weather" and call.call_id
    jsonschema.validate(json.loads(call.arguments), WEATHER["parameters"])


def test_the_function_call_output_round_trip(client):
    first = client.responses.create(model=model(client), input="What is the weather in Paris?", tools=[WEATHER],
                                    tool_choice={"type": "function", "name": "get_weather"}, max_output_tokens=80)
    call = first.output[0]
    second = client.responses.create(model=model(client), tools=[WEATHER], temperature=0, max_output_tokens=30,
                                     input=[{"role": "user", "content": "What is the weather in Paris?"},
                                            {"type": "function_call", "call_id": call.call_id, "name": call.name,
                                             "arguments": call.arguments},
                                            {"type": "function_call_output", "call_id": call.call_id,
                                             "output": "Sunny, 24 degrees"}])
    assert second.output_text and second.usage.input_tokens > first.usage.input_tokens


def test_previous_response_id_continues_the_conversation_from_cache(client):
    first = client.responses.create(model=model(client), input="My name is Ada. Remember it.", temperature=0,
                                    max_output_tokens=30)
    second = client.responses.create(model=model(client), input="What is my name?", temperature=0,
                                     max_output_tokens=30, previous_response_id=first.id)
    assert second.previous_response_id == first.id
    assert second.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens
    assert second.usage.input_tokens_details.cached_tokens >= first.usage.input_tokens - 16  # its KV reused
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model=model(client), input="Hi", previous_response_id="resp_unknown")


def test_text_format_json_schema_validates(client):
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                               "population": {"type": "integer", "minimum": 0, "maximum": 10**8}},
              "required": ["city", "population"], "additionalProperties": False}
    response = client.responses.create(model=model(client), input="Describe Paris.", max_output_tokens=120,
                                       temperature=0,
                                       text={"format": {"type": "json_schema", "name": "city", "schema": schema}})
    assert response.status == "completed"
    jsonschema.validate(json.loads(response.output_text), schema)


def test_max_output_tokens_makes_it_incomplete(client):
    response = client.responses.create(model=model(client), input="Write a long story.", max_output_tokens=5)
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
    assert response.usage.output_tokens == 5


@pytest.mark.parametrize("kwargs, param", [
    ({"tools": [{"type": "web_search"}]}, "tools"),
    ({"tools": [{"type": "code_interpreter", "container": {"type": "auto"}}]}, "tools"),
    ({"background": True}, "background"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "name": "nope"}}, "tool_choice"),
    ({"input": []}, "input"),
    ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format"),
    ({"tool_choice": "required"}, "tool_choice"),
])
def test_what_it_cannot_do_is_a_400_naming_it(client, kwargs, param):
    with pytest.raises(openai.BadRequestError) as error:
        client.responses.create(model=model(client), max_output_tokens=5, **{"input": "Hi", **kwargs})
    assert error.value.body["param"] == param


def test_deleted_responses_are_gone(client):
    response = client.responses.create(model=model(client), input="Hi", max_output_tokens=5)
    client.responses.delete(response.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(response.id)


def test_the_store_keeps_the_most_recently_used():
    store = ResponseStore(capacity=2)
    for name in ("a", "b"):
        store.put(StoredResponse(ResponseObject(id=name, model="m"), []))
    store.get("a")
    store.put(StoredResponse(ResponseObject(id="c", model="m"), []))
    assert list(store.responses) == ["a", "c"]


def test_an_agents_sdk_agent_runs_its_tool_to_completion(client, base_url):
    served = model(client)
    client = openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="-", max_retries=0)
    agents.set_default_openai_client(client, use_for_tracing=False)
    agents.set_tracing_disabled(True)
    cities = []

    @agents.function_tool
    def get_weather(city: str) -> str:
        """The current weather in a city."""
        cities.append(city)
        return f"Sunny in {city}."

    agent = agents.Agent(name="weather", instructions="Answer weather questions with the tool.",
                         model=served, tools=[get_weather],
                         model_settings=agents.ModelSettings(tool_choice="required", parallel_tool_calls=False,
                                                             temperature=0, max_tokens=80))
    result = asyncio.run(agents.Runner.run(agent, "What is the weather in Paris?", max_turns=4))
    assert cities and all(isinstance(city, str) and city for city in cities)
    assert isinstance(result.final_output, str) and result.final_output
