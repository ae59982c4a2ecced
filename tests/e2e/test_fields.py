"""Every OpenAI request field honoured (or refused with a 400) by the real server, via the OpenAI SDK."""

import asyncio
import math

import httpx
import openai
import pytest

pytestmark = pytest.mark.e2e

MODEL = "SmolLM2-135M-Instruct"
STORY = [{"role": "user", "content": "Tell me a short story about a robot."}]
REPEAT = [{"role": "user", "content": "Repeat the word 'cat' many times."}]


def chat(client, messages=STORY, **kwargs):
    kwargs.setdefault("temperature", 0)
    return client.chat.completions.create(model=MODEL, messages=messages, **kwargs)


def text(response, index=0) -> str:
    return response.choices[index].message.content


def test_seeded_sampling_is_the_same_alone_and_in_a_batch_of_eight(async_client):
    async def ask(prompt, seed):
        response = await async_client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": prompt}], temperature=0.9, top_p=0.95,
            extra_body={"top_k": 50}, seed=seed, max_tokens=20)
        return response.choices[0].message.content

    prompts = [f"Write a sentence about the number {i}." for i in range(8)]

    async def scenario():
        alone = await ask(prompts[3], 1234)
        together = await asyncio.gather(*(ask(p, 1234 if i == 3 else i) for i, p in enumerate(prompts)))
        return alone, together[3]

    alone, in_batch = asyncio.run(scenario())
    assert alone == in_batch


def greedy_ids(client, tokenizer, max_tokens: int) -> list[int]:
    return tokenizer(text(chat(client, max_tokens=max_tokens)), add_special_tokens=False).input_ids


def test_logit_bias_against_the_greedy_first_token_changes_it(client, tokenizer):
    first = greedy_ids(client, tokenizer, 1)[0]
    biased = chat(client, max_tokens=1, logit_bias={str(first): -100})
    assert tokenizer(text(biased), add_special_tokens=False).input_ids[0] != first
    boosted = chat(client, max_tokens=3, logprobs=True, logit_bias={"1000": 100})
    assert [e.token for e in boosted.choices[0].logprobs.content] == [tokenizer.decode([1000])] * 3


def test_penalties_change_repetitive_output(client):
    plain = text(chat(client, REPEAT, max_tokens=30))
    for penalties in ({"frequency_penalty": 2.0}, {"presence_penalty": 2.0}):
        assert text(chat(client, REPEAT, max_tokens=30, **penalties)) != plain
    repeated = text(chat(client, REPEAT, max_tokens=30, extra_body={"repetition_penalty": 1.8}))
    assert repeated != plain


def test_n_gives_indexed_choices_that_share_one_prompt(client):
    response = chat(client, n=3, temperature=1.0, seed=3, max_tokens=16, extra_body={"ignore_eos": True})
    assert [c.index for c in response.choices] == [0, 1, 2]
    assert len({c.message.content for c in response.choices}) == 3
    single = chat(client, max_tokens=16)
    assert response.usage.prompt_tokens == single.usage.prompt_tokens
    assert response.usage.completion_tokens == 3 * 16
    streamed = list(chat(client, n=2, temperature=1.0, seed=3, max_tokens=8, stream=True))
    finished = [c.choices[0].index for c in streamed if c.choices and c.choices[0].finish_reason]
    assert sorted(finished) == [0, 1]


def test_chat_logprobs_are_the_greedy_choice(client):
    response = chat(client, max_tokens=8, logprobs=True, top_logprobs=5)
    entries = response.choices[0].logprobs.content
    assert len(entries) == response.usage.completion_tokens
    assert "".join(e.token for e in entries).startswith(text(response)[:5])
    for entry in entries:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 5
        assert entry.top_logprobs[0].token == entry.token
        assert math.isclose(entry.top_logprobs[0].logprob, entry.logprob, abs_tol=1e-6)
        assert entry.bytes == list(entry.token.encode())
    streamed = [c.choices[0].logprobs for c in chat(client, max_tokens=8, logprobs=True, top_logprobs=2, stream=True)
                if c.choices and c.choices[0].logprobs]
    assert [e.token for chunk in streamed for e in chunk.content] == [e.token for e in entries]


def test_completion_logprobs_and_echo_in_the_legacy_shape(client):
    prompt = "The capital of France is"
    response = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0, logprobs=3,
                                         echo=True)
    choice = response.choices[0]
    logprobs = choice.logprobs
    assert choice.text.startswith(prompt)
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    assert len(logprobs.tokens) == response.usage.prompt_tokens + 4
    assert all(lp <= 0 for lp in logprobs.token_logprobs[1:])
    assert logprobs.text_offset == sorted(logprobs.text_offset) and logprobs.text_offset[0] == 0
    generated = logprobs.top_logprobs[-4:]
    assert all(len(top) <= 3 and max(top.values()) == lp for top, lp in zip(generated, logprobs.token_logprobs[-4:]))


def test_best_of_returns_the_most_likely_candidates(client):
    best = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=8, temperature=1.0,
                                     best_of=4, n=2, seed=11, logprobs=0)
    assert [c.index for c in best.choices] == [0, 1]
    totals = [sum(c.logprobs.token_logprobs) for c in best.choices]
    assert totals == sorted(totals, reverse=True)
    candidates = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=8, temperature=1.0,
                                           n=4, seed=11, logprobs=0)
    all_totals = sorted((sum(c.logprobs.token_logprobs) for c in candidates.choices), reverse=True)
    assert [round(t, 4) for t in totals] == [round(t, 4) for t in all_totals[:2]]


def test_stop_token_ids_min_tokens_and_ignore_eos(client, tokenizer):
    short = chat(client, [{"role": "user", "content": "Say OK."}], max_tokens=40)
    assert short.choices[0].finish_reason == "stop"
    longer = chat(client, [{"role": "user", "content": "Say OK."}], max_tokens=40,
                  extra_body={"min_tokens": short.usage.completion_tokens + 5})
    assert longer.usage.completion_tokens >= short.usage.completion_tokens + 5
    forced = chat(client, [{"role": "user", "content": "Say OK."}], max_tokens=12, extra_body={"ignore_eos": True})
    assert forced.usage.completion_tokens == 12 and forced.choices[0].finish_reason == "length"
    ids = greedy_ids(client, tokenizer, 10)
    stopped = chat(client, max_tokens=10, extra_body={"stop_token_ids": [ids[2]]})
    assert stopped.choices[0].finish_reason == "stop" and text(stopped) == tokenizer.decode(ids[:2])


def test_include_usage_and_accepted_fields(client):
    chunks = list(chat(client, max_tokens=4, stream=True, stream_options={"include_usage": True}, user="u-1",
                       metadata={"team": "qa"}, parallel_tool_calls=False, response_format={"type": "text"}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 4
    assert all(c.usage is None for c in chunks[:-1])


@pytest.mark.parametrize("kwargs, param", [
    ({"tools": [{"type": "retrieval"}]}, "tools.0.type"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"top_logprobs": 3}, None),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"logit_bias": {"5": 101}}, "logit_bias"),
    ({"logit_bias": {"999999": 1}}, "logit_bias"),
    ({"n": 0}, "n"),
    ({"n": 500}, "n"),
    ({"extra_body": {"top_k": 0}}, "top_k"),
    ({"extra_body": {"min_p": 1.5}}, "min_p"),
    ({"extra_body": {"repetition_penalty": 0}}, "repetition_penalty"),
    ({"extra_body": {"min_tokens": -1}}, "min_tokens"),
    ({"extra_body": {"stop_token_ids": [10 ** 9]}}, "stop_token_ids"),
])
def test_refused_values_name_their_field(client, kwargs, param):
    with pytest.raises(openai.BadRequestError) as error:
        chat(client, max_tokens=2, **kwargs)
    assert error.value.body["param"] == param
    assert error.value.body["type"] == "invalid_request_error" and error.value.body["message"]


@pytest.mark.parametrize("kwargs, param", [
    ({"logprobs": 6}, "logprobs"),
    ({"best_of": 1, "n": 2}, None),
    ({"suffix": "end"}, "suffix"),
    ({"best_of": 3, "stream": True}, None),
])
def test_completion_refusals(client, kwargs, param):
    with pytest.raises(openai.BadRequestError) as error:
        client.completions.create(model=MODEL, prompt="hi", max_tokens=2, **kwargs)
    assert error.value.body["param"] == param


def test_malformed_inputs_get_4xx_and_the_server_keeps_serving(base_url, client):
    url = f"{base_url}/v1/chat/completions"
    bodies = [
        b"", b"[]", b"null", b'{"model": 5}', b"\xff\xfe garbage",
        b'{"model": "%s", "messages": "hello"}' % MODEL.encode(),
        b'{"model": "%s", "messages": [{"role": "user"}], "temperature": "hot"}' % MODEL.encode(),
        b'{"model": "%s", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}' % MODEL.encode(),
    ]
    for body in bodies:
        response = httpx.post(url, content=body, headers={"content-type": "application/json"})
        assert 400 <= response.status_code < 500, (body, response.text)
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    huge = httpx.post(url, json={"model": MODEL, "messages": [{"role": "user", "content": "word " * 20000}]})
    assert huge.status_code == 400 and huge.json()["error"]["code"] == "context_length_exceeded"
    assert "Paris" in text(chat(client, [{"role": "user", "content": "What is the capital of France?"}]))


def test_unknown_model_lists_the_served_names(client):
    with pytest.raises(openai.NotFoundError) as error:
        client.completions.create(model="nope", prompt="hi")
    assert error.value.body["code"] == "model_not_found" and MODEL in error.value.body["message"]


def test_content_parts_carry_text_and_an_image_is_refused_by_a_text_model(client):
    parts = [{"type": "text", "text": "What is the capital"}, {"type": "text", "text": " of France?"}]
    reply = chat(client, messages=[{"role": "user", "content": parts}], temperature=0, max_tokens=12)
    assert "Paris" in text(reply)
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo=", "detail": "low"}}
    with pytest.raises(openai.BadRequestError) as refused:
        chat(client, messages=[{"role": "user", "content": [parts[0], image]}], max_tokens=4)
    assert refused.value.body["param"] == "messages[0].content[1]" and "text only" in refused.value.body["message"]
