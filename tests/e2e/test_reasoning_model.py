"""Reasoning end to end: a tiny model whose chat template opens a think block, served from a folder."""

import openai
import pytest
import transformers

from tests.helpers.server_process import running_server

pytestmark = pytest.mark.e2e

MESSAGES = [{"role": "user", "content": "What is 1+1?"}]


@pytest.fixture(scope="module")
def client(thinking_model):
    folder, _ = thinking_model
    with running_server("--hf-model", str(folder), "--served-model-name", "thinker") as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="-", max_retries=0)


def chat_prompt_ids(thinking_model, template_kwargs=None) -> list[int]:
    folder, _ = thinking_model
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    variables = template_kwargs or {}
    text = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False, **variables)
    return tokenizer(text, add_special_tokens=False).input_ids


def raw_completion(client, thinking_model, template_kwargs=None, **kwargs) -> str:
    """The same generation without reasoning parsing: the rendered chat prompt sent as a completion."""
    prompt = chat_prompt_ids(thinking_model, template_kwargs)
    return client.completions.create(model="thinker", prompt=prompt, temperature=0, **kwargs).choices[0].text


def test_text_after_a_template_opened_think_is_reasoning(client, thinking_model):
    raw = raw_completion(client, thinking_model, max_tokens=12)
    assert "</think>" not in raw and raw
    response = client.chat.completions.create(model="thinker", messages=MESSAGES, temperature=0, max_tokens=12)
    message = response.choices[0].message
    assert message.reasoning_content == raw and message.reasoning == raw and message.content == ""
    chunks = list(client.chat.completions.create(model="thinker", messages=MESSAGES, temperature=0, max_tokens=12,
                                                 stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == raw
    assert "".join(getattr(d, "reasoning", None) or "" for d in deltas) == raw
    assert "".join(d.content or "" for d in deltas) == ""


def test_a_template_variable_can_switch_thinking_off(client, thinking_model):
    off = {"enable_thinking": False}
    raw = raw_completion(client, thinking_model, template_kwargs=off, max_tokens=12)
    response = client.chat.completions.create(model="thinker", messages=MESSAGES, temperature=0, max_tokens=12,
                                              extra_body={"chat_template_kwargs": off})
    assert response.usage.prompt_tokens == len(chat_prompt_ids(thinking_model, off))
    assert response.usage.prompt_tokens != len(chat_prompt_ids(thinking_model))
    message = response.choices[0].message
    assert message.content == raw and getattr(message, "reasoning_content", None) is None


@pytest.mark.parametrize("spelling", ["reasoning_content", "reasoning"])
def test_an_earlier_reply_may_send_its_reasoning_back_in_either_spelling(client, spelling):
    earlier = {"role": "assistant", "content": "2", spelling: "One plus one."}
    response = client.chat.completions.create(model="thinker", max_tokens=2, temperature=0,
                                              messages=MESSAGES + [earlier, {"role": "user", "content": "And 2+2?"}],
                                              extra_body={"ignore_eos": True})
    assert response.choices[0].finish_reason == "length"


def test_closing_tag_moves_the_rest_to_content(client, thinking_model):
    _, close_id = thinking_model
    response = client.chat.completions.create(model="thinker", messages=MESSAGES, temperature=0, max_tokens=3,
                                              logit_bias={str(close_id): 100})
    message = response.choices[0].message
    assert getattr(message, "reasoning_content", None) is None and getattr(message, "reasoning", None) is None
    assert message.content == "</think></think>"


def test_r1_settings_can_drop_the_reasoning(client):
    response = client.chat.completions.create(model="thinker", messages=MESSAGES, temperature=0, max_tokens=6,
                                              extra_body={"r1_settings": {"return_think_data": False,
                                                                          "few_shot_mode": "DROP"}})
    assert getattr(response.choices[0].message, "reasoning_content", None) is None
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model="thinker", messages=MESSAGES, max_tokens=2,
                                       extra_body={"r1_settings": {"few_shot_mode": "SOMETIMES"}})
    assert error.value.body["param"] == "r1_settings.few_shot_mode"


def test_responses_put_reasoning_in_its_own_item(client, thinking_model):
    raw = raw_completion(client, thinking_model, max_tokens=12)
    response = client.responses.create(model="thinker", input=MESSAGES, temperature=0, max_output_tokens=12)
    [item] = response.output
    assert item.type == "reasoning" and item.content[0].text == raw
    assert response.status == "incomplete" and 0 < response.usage.output_tokens_details.reasoning_tokens <= 12
    events = list(client.responses.create(model="thinker", input=MESSAGES, temperature=0, max_output_tokens=12,
                                          stream=True))
    assert "".join(e.delta for e in events if e.type == "response.reasoning_text.delta") == raw
    assert events[-1].type == "response.incomplete" and events[-1].response.output[0].content[0].text == raw
