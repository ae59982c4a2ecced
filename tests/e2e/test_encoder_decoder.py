"""Encoder-decoder chat over HTTP with the real openai SDK: a tiny random Flan-T5 without a chat template (the
plain dialogue fallback) and a tiny random BART with one (on the static cache), each saved to a folder and served
by main.py. Greedy text equals transformers' `generate` on the same encoder input; bounds and unsupported fields
get 400s."""

import openai
import pytest
import torch
import transformers

from tests.helpers.server_process import running_server
from tests.helpers.tiny_models import tiny_seq2seq

pytestmark = pytest.mark.e2e

ENCODER_LENGTH, DECODER_LENGTH = 48, 24


SERVERS = {"flan-t5": [], "bart": ["--static-cache", "true"]}


@pytest.fixture(scope="module", params=list(SERVERS))
def served(request, tokenizer, tmp_path_factory):
    """(client, model, tokenizer) of a server for the architecture; the T5 tokenizer has no chat template."""
    folder = tmp_path_factory.mktemp(request.param)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    if request.param != "bart":
        tokenizer.chat_template = None
    model, _ = tiny_seq2seq(request.param, seed=3, tokenizer=tokenizer)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    with running_server("--hf-model", str(folder), "--architecture-type", "encoder-decoder",
                        "--served-model-name", "seq2seq", "--continuous-batching-batch-size", "4",
                        "--static-cache-encoder-max-length", str(ENCODER_LENGTH),
                        "--static-cache-decoder-max-length", str(DECODER_LENGTH), *SERVERS[request.param]) as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="-", max_retries=0), model, tokenizer


def expected_text(model, tokenizer, encoder_ids: list[int], max_tokens: int) -> str:
    with torch.inference_mode():
        output = model.generate(torch.tensor([encoder_ids]), max_new_tokens=max_tokens, do_sample=False)
    return tokenizer.decode(output[0], skip_special_tokens=True)


def chat_encoder_ids(tokenizer, messages: list[dict]) -> list[int]:
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    else:  # the documented fallback: a lone user message as it is
        text = messages[0]["content"]
    return tokenizer(text).input_ids


MESSAGES = [{"role": "user", "content": "Translate to German: the house is small."}]


def test_chat_answers_as_generate_does_and_counts_the_encoder_input(served):
    client, model, tokenizer = served
    response = client.chat.completions.create(model="seq2seq", messages=MESSAGES, temperature=0, max_tokens=12)
    encoder_ids = chat_encoder_ids(tokenizer, MESSAGES)
    choice = response.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == expected_text(model, tokenizer, encoder_ids, 12)
    assert response.usage.prompt_tokens == len(encoder_ids)
    assert 0 < response.usage.completion_tokens <= 12
    assert choice.finish_reason in ("stop", "length")


def test_streamed_chat_is_the_same_text(served):
    client, _, _ = served
    whole = client.chat.completions.create(model="seq2seq", messages=MESSAGES, temperature=0, max_tokens=12)
    chunks = list(client.chat.completions.create(model="seq2seq", messages=MESSAGES, temperature=0, max_tokens=12,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_completions_sample_several_choices_with_logprobs(served):
    client, model, tokenizer = served
    prompt = "summarize: a cat sat on the mat"
    greedy = client.completions.create(model="seq2seq", prompt=prompt, temperature=0, max_tokens=8)
    assert greedy.choices[0].text == expected_text(model, tokenizer, tokenizer(prompt).input_ids, 8)
    sampled = client.completions.create(model="seq2seq", prompt=prompt, temperature=1.5, max_tokens=8, n=3,
                                        seed=11, logprobs=2)
    assert sorted(c.index for c in sampled.choices) == [0, 1, 2]  # (seeds part ways: the engine tests show it)
    for choice in sampled.choices:
        assert all(len(top) == 2 for top in choice.logprobs.top_logprobs)
    assert sampled.usage.prompt_tokens == len(tokenizer(prompt).input_ids)


def test_structured_output_constrains_the_decoder(served):
    client, _, _ = served
    response = client.chat.completions.create(model="seq2seq", messages=MESSAGES, max_tokens=8,
                                              extra_body={"guided_choice": ["yes", "no"]})
    assert response.choices[0].message.content in ("yes", "no")


def test_bounds_and_decoder_only_fields_get_clear_400s(served):
    client, _, tokenizer = served
    too_long = " ".join(["word"] * 200)
    with pytest.raises(openai.BadRequestError) as error:
        client.completions.create(model="seq2seq", prompt=too_long, max_tokens=4)
    assert error.value.body["code"] == "context_length_exceeded"
    assert f"at most {ENCODER_LENGTH} tokens" in error.value.body["message"]
    assert str(len(tokenizer(too_long).input_ids)) in error.value.body["message"]
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model="seq2seq", messages=MESSAGES, max_tokens=DECODER_LENGTH + 5)
    assert error.value.body["param"] == "max_tokens" and str(DECODER_LENGTH + 5) in error.value.body["message"]
    with pytest.raises(openai.BadRequestError) as error:
        client.completions.create(model="seq2seq", prompt="hello", max_tokens=4, echo=True)
    assert error.value.body["param"] == "echo"
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model="seq2seq", max_tokens=4, messages=[
            {"role": "user", "content": [{"type": "text", "text": "what is this?"}, image]}])
    assert error.value.body["param"] == "messages[0].content[1]"


def test_an_encoder_decoder_server_cannot_embed(served):
    client, _, _ = served
    with pytest.raises(openai.BadRequestError) as raised:
        client.embeddings.create(model="seq2seq", input="x")
    assert "cannot embed" in raised.value.body["message"] and raised.value.body["param"] == "model"
