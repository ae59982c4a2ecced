"""Tools and tool turns reach the prompt: through a chat template that renders tools (Hermes/Qwen style),
or described in the system prompt for a template that ignores them (the embedded SmolLM2's)."""

import asyncio
import json

import pytest

from models import ChatCompletionRequest
from model_manager import LoadedModel
from serving.chat import chat_prompt
from serving.text_service import ServingOptions, TextService
from tests.helpers.engine import make_engine
from tests.helpers.tiny_models import tiny_model

HERMES_TEMPLATE = (
    "{% if tools %}<|im_start|>system\n# Tools\n<tools>{% for tool in tools %}\n{{ tool | tojson }}{% endfor %}\n"
    "</tools><|im_end|>\n{% endif %}"
    "{% for message in messages %}"
    "{% if message.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ message.content }}\n</tool_response>"
    "<|im_end|>\n"
    "{% elif message.tool_calls %}<|im_start|>assistant\n{% for call in message.tool_calls %}<tool_call>\n"
    '{"name": "{{ call.function.name }}", "arguments": {{ call.function.arguments | tojson }}}\n</tool_call>'
    "{% endfor %}<|im_end|>\n"
    "{% else %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}
DIALOGUE = [
    {"role": "user", "content": "Weather in Oslo?"},
    {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
        "name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "-3 and snowing"},
]


def service_for(tokenizer, template=None) -> TextService:
    tokenizer = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)  # a copy whose template can change
    if template:
        tokenizer.chat_template = template
    model = tiny_model("llama", len(tokenizer))
    loaded = LoadedModel(model, tokenizer, "tiny", 1024)
    return TextService(make_engine(model, tokenizer), loaded, ServingOptions(("tiny",)))


def prompt_text(service, **body) -> str:
    request = ChatCompletionRequest(model="tiny", messages=DIALOGUE, **body)
    [prompt] = asyncio.run(chat_prompt(service, request))
    return service.tokenizer.decode(prompt.ids)


@pytest.mark.parametrize("template", [HERMES_TEMPLATE, None])
def test_tools_and_tool_turns_reach_the_prompt(tokenizer, template):
    service = service_for(tokenizer, template)
    assert service.template.renders_tools == (template is not None)
    assert service.template.tool_format.name == "hermes"
    text = prompt_text(service, tools=[WEATHER])
    assert json.dumps(WEATHER["function"]["parameters"]) in text
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>' in text
    assert "<tool_response>\n-3 and snowing\n</tool_response>" in text


def test_tool_choice_none_hides_the_tools(tokenizer):
    service = service_for(tokenizer, HERMES_TEMPLATE)
    assert "<tools>" in prompt_text(service, tools=[WEATHER])
    assert "<tools>" not in prompt_text(service, tools=[WEATHER], tool_choice="none")
