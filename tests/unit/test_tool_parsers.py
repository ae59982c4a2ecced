"""Tool calls parsed from replies recorded in each template family's layout, whole and at every split,
and malformed or partial calls falling back to content."""

import dataclasses
import json
import random

import pytest

from config import Config
from serving.tool_parsers import FORMATS, ArgumentsAdded, CallStarted, ToolCallParser, detect_format
from serving.tool_parsers.formats import HERMES, LLAMA3_JSON, MISTRAL

TOOLS = {"get_current_temperature", "get_temperature_date", "get_current_weather"}

# (format, reply, expected content, expected [(name, arguments)])
RECORDED = [
    (HERMES, '<tool_call>\n{"name": "get_current_temperature", "arguments": {"location": "San Francisco, CA, USA", '
             '"unit": "celsius"}}\n</tool_call>\n<tool_call>\n{"name": "get_temperature_date", "arguments": '
             '{"location": "San Francisco, CA, USA", "date": "2024-10-01", "unit": "celsius"}}\n</tool_call>', "",
     [("get_current_temperature", {"location": "San Francisco, CA, USA", "unit": "celsius"}),
      ("get_temperature_date", {"location": "San Francisco, CA, USA", "date": "2024-10-01", "unit": "celsius"})]),
    (HERMES, 'Let me look that up.\n\n<tool_call>\n{"name": "get_current_weather", "arguments": {"location": '
             '"Boston, MA", "nested": {"a": [1, {"b": "}"}]}}}\n</tool_call>', "Let me look that up.\n\n",
     [("get_current_weather", {"location": "Boston, MA", "nested": {"a": [1, {"b": "}"}]}})]),
    (HERMES, "The weather is sunny, with no call at all.", "The weather is sunny, with no call at all.", []),
    (LLAMA3_JSON, '{"name": "get_current_weather", "parameters": {"location": "Paris", "unit": "celsius"}}', "",
     [("get_current_weather", {"location": "Paris", "unit": "celsius"})]),
    (LLAMA3_JSON, '<|python_tag|>{"name": "get_current_temperature", "parameters": {"location": "Oslo"}}; '
                  '{"name": "get_current_weather", "parameters": {}}', "",
     [("get_current_temperature", {"location": "Oslo"}), ("get_current_weather", {})]),
    (LLAMA3_JSON, "It is {probably} warm.", "It is {probably} warm.", []),
    (MISTRAL, '[TOOL_CALLS][{"name": "get_current_weather", "arguments": {"location": "Paris, France", "format": '
              '"celsius"}}, {"name": "get_current_temperature", "arguments": "{\\"location\\": \\"Lyon\\"}"}]', "",
     [("get_current_weather", {"location": "Paris, France", "format": "celsius"}),
      ("get_current_temperature", {"location": "Lyon"})]),
]


def parse(fmt, chunks, parallel=True):
    parser = ToolCallParser(fmt, TOOLS, parallel)
    events = [event for chunk in chunks for event in parser.feed(chunk)] + parser.finish()
    content = "".join(e for e in events if isinstance(e, str))
    names = {e.index: e.name for e in events if isinstance(e, CallStarted)}
    arguments = {index: "" for index in names}
    for event in events:
        if isinstance(event, ArgumentsAdded):
            assert event.index in names, "arguments before the call's name"
            arguments[event.index] += event.text
    return content, [(names[i], arguments[i]) for i in sorted(names)], parser


def random_splits(text, count=40, seed=0):
    rng = random.Random(seed)
    yield [text]
    yield list(text)
    for _ in range(count):
        cuts = sorted(rng.sample(range(1, len(text)), rng.randint(1, min(12, len(text) - 1))))
        yield [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]


@pytest.mark.parametrize("fmt, reply, content, calls", RECORDED)
def test_recorded_replies_parse_the_same_however_they_stream(fmt, reply, content, calls):
    for chunks in random_splits(reply):
        got_content, got_calls, parser = parse(fmt, chunks)
        assert got_content == content, chunks
        assert [(name, json.loads(arguments)) for name, arguments in got_calls] == calls, chunks
        assert all(call.valid for call in parser.started)


def test_markup_never_reaches_content_while_streaming():
    reply = RECORDED[1][1]
    parser = ToolCallParser(HERMES, TOOLS)
    shown = "".join(e for ch in reply for e in parser.feed(ch) if isinstance(e, str))
    assert "<" not in shown and shown == "Let me look that up.\n\n"


def test_a_call_to_an_unknown_tool_is_content():
    reply = '<tool_call>\n{"name": "launch_rockets", "arguments": {}}\n</tool_call>'
    assert parse(HERMES, [reply])[:2] == (reply, [])


def test_a_cut_off_call_is_marked_invalid_and_unfinished_markup_is_content():
    content, calls, parser = parse(HERMES, ['<tool_call>\n{"name": "get_current_weather", "arguments": {"loc'])
    assert calls == [("get_current_weather", '{"loc')] and not parser.started[0].valid
    assert parse(HERMES, ["Hi <tool_call>\n{"])[:2] == ("Hi <tool_call>\n{", [])
    assert parse(HERMES, ["Hi <tool_ca"])[:2] == ("Hi <tool_ca", [])


def test_without_parallel_calls_only_the_first_call_counts():
    _, calls, _ = parse(HERMES, [RECORDED[0][1]], parallel=False)
    assert [name for name, _ in calls] == ["get_current_temperature"]


def test_missing_arguments_are_an_empty_object():
    _, calls, _ = parse(HERMES, ['<tool_call>{"name": "get_current_weather"}</tool_call>'])
    assert calls == [("get_current_weather", "{}")]


@pytest.mark.parametrize("template, expected", [
    ("{% for tool in tools %}...<tool_call>\n{{ tool_call | tojson }}\n</tool_call>{% endfor %}", "hermes"),
    ("{{- '<|python_tag|>' + tool_call.name }}Environment: ipython", "llama3_json"),
    ("{{ '[TOOL_CALLS]' + tool_calls | tojson }}", "mistral"),
    ("{{ message['content'] }}", "hermes"),
    (None, "hermes"),
])
def test_the_format_follows_the_chat_template(template, expected):
    assert detect_format(template).name == expected
    assert detect_format(template, "mistral") is FORMATS["mistral"]


def test_the_cli_offers_every_format():
    field = next(f for f in dataclasses.fields(Config) if f.name == "tool_call_parser")
    assert set(field.metadata["choices"]) == {"auto", *FORMATS}
