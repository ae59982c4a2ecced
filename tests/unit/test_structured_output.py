"""Grammars enforced on the batched sampler: masks that admit exactly what the grammar allows, replies
from a random-weight model that always validate, and free rows untouched by constrained neighbours."""

import asyncio
import json

import jsonschema
import pytest
import torch

from batching import SamplingParams, Sequence, TokenLogprob
from batching.detokenizer import IncrementalDetokenizer
from batching.sampler import sample
from serving.errors import APIError
from serving.grammars import GrammarCompiler
from serving.tool_parsers import FORMATS, ToolCallParser
from tests.helpers.engine import finish, greedy, make_engine, run_with_engine
from tests.helpers.tiny_models import byte_tokenizer, tiny_model

SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                      "age": {"type": "integer", "minimum": 0, "maximum": 150},
                                      "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}},
     "required": ["name", "age", "tags"], "additionalProperties": False},
    {"type": "object", "$defs": {"point": {"type": "object",
                                           "properties": {"x": {"type": "integer", "minimum": -50, "maximum": 50}},
                                           "required": ["x"], "additionalProperties": False}},
     "properties": {"where": {"$ref": "#/$defs/point"},
                    "label": {"anyOf": [{"type": "string", "maxLength": 5}, {"type": "null"}]}},
     "required": ["where", "label"], "additionalProperties": False},
    {"type": "array", "items": {"type": "boolean"}, "minItems": 1, "maxItems": 4},
    {"enum": ["yes", "no", "maybe"]},
]
TOOLS = [{"name": "get_weather", "parameters": {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 16}, "unit": {"enum": ["c", "f"]}}, "required": ["city", "unit"],
    "additionalProperties": False}},
    {"name": "get_time", "parameters": {"type": "object", "properties": {}, "additionalProperties": False}}]


@pytest.fixture(scope="module")
def bytes_grammars():
    tokenizer = byte_tokenizer()
    return tokenizer, GrammarCompiler(tokenizer, len(tokenizer), frozenset({0}))


def constrained_seq(tokenizer, grammar, output: str = "") -> Sequence:
    seq = Sequence([1], SamplingParams(max_tokens=20, temperature=0.0, grammar=grammar),
                   IncrementalDetokenizer(tokenizer, []), frozenset({0}))
    for token in tokenizer(output).input_ids:
        assert seq.constraint.accept(token)
    return seq


def test_the_mask_admits_exactly_the_grammar_next_characters(bytes_grammars):
    tokenizer, grammars = bytes_grammars
    grammar = grammars.regex(r"(ab|cd)e?", "guided_regex")
    allowed = []
    for output in ["", "a", "ab"]:
        logits = torch.eye(len(tokenizer))  # row r prefers token r: each token is tried once
        picked = sample(logits, [constrained_seq(tokenizer, grammar, output) for _ in range(len(tokenizer))])
        allowed.append({tokenizer.decode([t.token_id]) for t in picked})
    assert allowed == [{"a", "c"}, {"b"}, {"e", "<eos>"}]


def test_free_rows_keep_their_argmax_beside_a_constrained_row(bytes_grammars):
    tokenizer, grammars = bytes_grammars
    logits = torch.randn(3, len(tokenizer))
    free = Sequence([1], SamplingParams(max_tokens=5, temperature=0.0), IncrementalDetokenizer(tokenizer, []),
                    frozenset({0}))
    seqs = [free, constrained_seq(tokenizer, grammars.choice(["xyz"], "guided_choice")), free]
    tokens = [t.token_id for t in sample(logits, seqs)]
    assert tokens[0] == int(logits[0].argmax()) and tokens[2] == int(logits[2].argmax())
    assert tokenizer.decode([tokens[1]]) == "x"


def test_a_complete_grammar_finishes_the_sequence(bytes_grammars):
    tokenizer, grammars = bytes_grammars
    seq = constrained_seq(tokenizer, grammars.choice(["ok"], "guided_choice"))
    deltas = [seq.append_token(TokenLogprob(t, 0.0)) for t in tokenizer("ok").input_ids]
    assert "".join(d.text for d in deltas) == "ok" and deltas[-1].finish_reason == "stop"
    with pytest.raises(ValueError, match="breaks the request's grammar"):
        constrained_seq(tokenizer, grammars.choice(["ok"], "guided_choice")).append_token(
            TokenLogprob(tokenizer("z").input_ids[0], 0.0))


@pytest.mark.parametrize("schema, keyword", [
    ({"type": "array", "uniqueItems": True}, "uniqueItems"),
    ({"not": {"type": "string"}}, "not"),
    ({"type": "string", "format": "no-such-format"}, "no-such-format"),
])
def test_a_schema_feature_that_cannot_be_enforced_is_named(bytes_grammars, schema, keyword):
    _, grammars = bytes_grammars
    with pytest.raises(APIError) as error:
        grammars.json_schema(schema, "response_format")
    assert error.value.status == 400 and keyword in error.value.message and error.value.param == "response_format"


def test_compiled_grammars_are_cached(bytes_grammars):
    _, grammars = bytes_grammars
    first = grammars.json_schema(SCHEMAS[0], "response_format")
    assert grammars.json_schema(SCHEMAS[0], "response_format") is first
    assert grammars.json_schema(SCHEMAS[1], "response_format") is not first


def generate_texts(model, tokenizer, jobs: list[tuple[list[int], SamplingParams]]) -> list[Sequence]:
    async def body(engine):
        seqs = [engine.add(prompt, params) for prompt, params in jobs]
        return list(await asyncio.gather(*(finish(engine, s) for s in seqs)))
    return run_with_engine(lambda: make_engine(model, tokenizer, batch_size=8), body)


def test_random_weights_answer_in_shape_and_free_rows_are_unaffected(tokenizer):
    """A random-weight model only produces valid JSON if the mask does all the work; free rows sharing its
    batches decode exactly as they do alone (batch-invariant engine)."""
    model = tiny_model("llama", len(tokenizer), seed=5)
    grammars = GrammarCompiler(tokenizer, len(tokenizer), frozenset({tokenizer.eos_token_id}))
    constrained = [([5, 6, 7 + i], SamplingParams(max_tokens=120, temperature=0.0 if i % 2 else 1.0, seed=i,
                                                  grammar=grammars.json_schema(schema, "response_format")))
                   for i, schema in enumerate(SCHEMAS)]
    free = [([9 + i, 10, 11], greedy(24)) for i in range(3)]
    seqs = generate_texts(model, tokenizer, constrained + free)
    for seq, schema in zip(seqs, SCHEMAS):
        text = tokenizer.decode(seq.output_ids, skip_special_tokens=True)
        assert seq.finish_reason == "stop", text
        jsonschema.validate(json.loads(text), schema)
    alone = [generate_texts(model, tokenizer, [job])[0].output_ids for job in free]
    assert [s.output_ids for s in seqs[len(SCHEMAS):]] == alone


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_forced_calls_parse_back_into_valid_calls(tokenizer, name):
    fmt = FORMATS[name]
    model = tiny_model("qwen2", len(tokenizer), seed=2)
    grammars = GrammarCompiler(tokenizer, len(tokenizer), frozenset({tokenizer.eos_token_id}))
    grammar = grammars.lark(fmt.forced_grammar(TOOLS, parallel=True), "tools")
    jobs = [([20 + i, 21], SamplingParams(max_tokens=200, temperature=1.0, seed=i, grammar=grammar)) for i in range(3)]
    for seq in generate_texts(model, tokenizer, jobs):
        text = tokenizer.decode(seq.output_ids, skip_special_tokens=True)
        parser = ToolCallParser(fmt, {tool["name"] for tool in TOOLS})
        parser.feed(text)
        parser.finish()
        assert seq.finish_reason == "stop" and parser.started, text
        for call in parser.started:
            schema = next(tool["parameters"] for tool in TOOLS if tool["name"] == call.name)
            jsonschema.validate(json.loads("".join(call.arguments)), schema)
