"""Structured outputs with the embedded 135M model and the real openai SDK: it cannot answer well, but it
always answers in shape, on chat and completions, streamed or not, one choice or several."""

import json

import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

SCHEMAS = {
    "person": {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 30}, "age": {"type": "integer", "minimum": 0, "maximum": 130},
        "color": {"enum": ["red", "green", "blue"]}}, "required": ["name", "age", "color"],
        "additionalProperties": False},
    "order": {"type": "object", "$defs": {"item": {"type": "object", "properties": {
        "sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{3}$"}, "qty": {"type": "integer", "minimum": 1,
                                                                              "maximum": 9}},
        "required": ["sku", "qty"], "additionalProperties": False}},
        "properties": {"items": {"type": "array", "items": {"$ref": "#/$defs/item"}, "minItems": 1, "maxItems": 3},
                       "note": {"anyOf": [{"type": "string", "maxLength": 20}, {"type": "null"}]}},
        "required": ["items", "note"], "additionalProperties": False},
    "verdict": {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
                "additionalProperties": False},
}
ASK = [{"role": "user", "content": "Reply with the requested JSON."}]


def model(client):
    return client.models.list().data[0].id


def json_schema_format(name):
    return {"type": "json_schema", "json_schema": {"name": name, "schema": SCHEMAS[name], "strict": True}}


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_json_schema_replies_validate(client, name):
    reply = client.chat.completions.create(model=model(client), messages=ASK, n=3, temperature=1.0, seed=1,
                                           max_tokens=200, response_format=json_schema_format(name))
    for choice in reply.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), SCHEMAS[name])


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_streamed_json_schema_replies_validate(client, name):
    stream = client.chat.completions.create(model=model(client), messages=ASK, n=2, max_tokens=200, stream=True,
                                            response_format=json_schema_format(name))
    texts, reasons = ["", ""], [None, None]
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            reasons[choice.index] = choice.finish_reason or reasons[choice.index]
    assert reasons == ["stop", "stop"]
    for text in texts:
        jsonschema.validate(json.loads(text), SCHEMAS[name])


@pytest.mark.parametrize("shape", [{"response_format": {"type": "json_object"}},
                                   {"extra_body": {"structured_outputs": {"json_object": True}}}])
@pytest.mark.parametrize("question", ['Return a JSON object with one key "answer" whose value is "yes".',
                                      "What is the capital of France? Answer in JSON."])
def test_json_object_replies_parse(client, question, shape):
    """No schema bounds a json_object reply: a question the model can answer, greedily, finishes it (a sampled
    one may run past any token limit)."""
    reply = client.chat.completions.create(model=model(client), messages=[{"role": "user", "content": question}],
                                           max_tokens=200, temperature=0, **shape)
    assert reply.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(reply.choices[0].message.content), dict)


class Step(BaseModel):
    action: str = Field(max_length=40)
    done: bool


class Plan(BaseModel):
    title: str = Field(max_length=40)
    steps: list[Step] = Field(min_length=1, max_length=3)


def test_sdk_parse_helper_returns_the_pydantic_model(client):
    reply = client.chat.completions.parse(model=model(client), messages=[{"role": "user", "content": "Plan a picnic."}],
                                          response_format=Plan, max_tokens=400, temperature=0)
    assert reply.choices[0].finish_reason == "stop"
    assert isinstance(reply.choices[0].message.parsed, Plan)


def test_sdk_stream_helper_assembles_the_pydantic_model(client):
    picnic = [{"role": "user", "content": "Plan a picnic."}]
    with client.beta.chat.completions.stream(model=model(client), response_format=Plan, max_tokens=400,
                                             temperature=0, messages=picnic) as stream:
        deltas = [event.delta for event in stream if event.type == "content.delta"]
        final = stream.get_final_completion()
    assert len(deltas) > 1 and isinstance(final.choices[0].message.parsed, Plan)


@pytest.mark.parametrize("extra, check", [
    ({"guided_choice": ["yes", "no"]}, lambda text: text in ("yes", "no")),
    ({"guided_regex": r"[0-9]{3}-[0-9]{4}"}, lambda text: len(text) == 8 and text[3] == "-"),
    ({"guided_json": SCHEMAS["verdict"]}, lambda text: isinstance(json.loads(text)["ok"], bool)),
    ({"guided_json": json.dumps(SCHEMAS["verdict"])}, lambda text: isinstance(json.loads(text)["ok"], bool)),
    ({"response_format": json_schema_format("person")},
     lambda text: jsonschema.validate(json.loads(text), SCHEMAS["person"]) is None),
    ({"guided_grammar": 'start: "A" ("B" | "C")'}, lambda text: text in ("AB", "AC")),
    ({"guided_grammar": 'root ::= "x" [0-9]'}, lambda text: len(text) == 2 and text[0] == "x" and text[1].isdigit()),
    ({"structured_outputs": {"choice": ["yes", "no"]}}, lambda text: text in ("yes", "no")),
    ({"structured_outputs": {"regex": r"[0-9]{3}-[0-9]{4}"}}, lambda text: len(text) == 8 and text[3] == "-"),
    ({"structured_outputs": {"json": SCHEMAS["verdict"]}}, lambda text: isinstance(json.loads(text)["ok"], bool)),
    ({"structured_outputs": {"grammar": 'start: "A" ("B" | "C")'}}, lambda text: text in ("AB", "AC")),
])
def test_completions_follow_guided_fields(client, extra, check):
    reply = client.completions.create(model=model(client), prompt="The answer:", max_tokens=120, n=2,
                                      temperature=1.0, extra_body=extra)
    for choice in reply.choices:
        assert choice.finish_reason == "stop" and check(choice.text), choice.text


@pytest.mark.parametrize("kwargs, param, words", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": {
        "type": "array", "uniqueItems": True}}}}, "response_format", "uniqueItems"),
    ({"response_format": {"type": "json_schema"}}, "response_format", "needs a json_schema"),
    ({"extra_body": {"guided_regex": "(unclosed"}}, "guided_regex", ""),
    ({"extra_body": {"guided_json": "{not json"}}, "guided_json", "not valid JSON"),
    ({"extra_body": {"guided_regex": "a", "guided_choice": ["b"]}}, None, "only one of"),
    ({"extra_body": {"structured_outputs": {"json": "{not json"}}}, "structured_outputs.json", "not valid JSON"),
    ({"extra_body": {"guided_regex": "a", "structured_outputs": {"choice": ["b"]}}}, None,
     "only one of guided_regex, structured_outputs.choice"),
    ({"extra_body": {"structured_outputs": {"structural_tag": "{}"}}}, "structured_outputs.structural_tag",
     "not supported"),
])
def test_constraints_that_cannot_be_enforced_are_refused(client, kwargs, param, words):
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model=model(client), messages=ASK, max_tokens=5, **kwargs)
    assert error.value.body["param"] == param and words in error.value.body["message"]
