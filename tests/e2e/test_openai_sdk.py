"""End to end: the real server with the embedded SmolLM2, driven by the official OpenAI SDK."""

import asyncio
import json

import httpx
import openai
import pytest

from tests.helpers.abandoned import health, leave_once_running, wait_until_quiet

MODEL = "SmolLM2-135M-Instruct"
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]

pytestmark = pytest.mark.e2e


def chat(client, messages=FRANCE, **kwargs):
    return client.chat.completions.create(model=MODEL, messages=messages, temperature=0, **kwargs)


def test_discovery_endpoints(client, base_url):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    root = httpx.get(base_url).json()
    assert root["model"] == MODEL and root["serving_type"] == "chat" and "/v1/chat/completions" in root["endpoints"]
    response = httpx.get(f"{base_url}/health")
    assert response.status_code == 200 and response.json()["status"] == "ok"


def test_chat_answers_with_usage(client):
    response = chat(client)
    choice = response.choices[0]
    assert "Paris" in choice.message.content and choice.message.role == "assistant"
    assert choice.finish_reason == "stop" and response.object == "chat.completion"
    usage = response.usage
    assert usage.prompt_tokens > 10 and usage.completion_tokens > 3
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_stream_gives_role_then_content_then_finish_then_usage(client):
    whole = chat(client).choices[0].message.content
    chunks = list(chat(client, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    content = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(content) == whole and len(content) > 3
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "stop" and set(finishes[:-1]) == {None}
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 3
    assert len({c.id for c in chunks}) == 1


@pytest.mark.parametrize("limit", ["max_tokens", "max_completion_tokens"])
def test_token_limit_ends_with_length(client, limit):
    response = chat(client, **{limit: 4})
    assert response.choices[0].finish_reason == "length" and response.usage.completion_tokens == 4


def test_stop_string_is_cut_and_not_returned(client):
    whole = chat(client).choices[0].message.content
    cut = whole.index("Paris")
    response = chat(client, stop=["Paris", "never-there"])
    assert response.choices[0].message.content == whole[:cut] and response.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].delta.content or "" for c in chat(client, stop="Paris", stream=True))
    assert streamed == whole[:cut]


def test_completions_one_choice_per_prompt(client):
    prompts = ["The capital of France is", "One, two, three,"]
    response = client.completions.create(model=MODEL, prompt=prompts, max_tokens=8, temperature=0)
    assert [c.index for c in response.choices] == [0, 1] and response.object == "text_completion"
    for prompt, choice in zip(prompts, response.choices):
        alone = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0)
        assert choice.text == alone.choices[0].text and choice.finish_reason == "length"
    assert response.usage.completion_tokens == 16
    streamed = client.completions.create(model=MODEL, prompt=prompts[0], max_tokens=8, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == response.choices[0].text


def test_seed_reproduces_sampled_text(client):
    def sampled(seed):
        return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Tell me a story."}],
                                              temperature=1.0, top_p=0.95, seed=seed, max_tokens=24)
    first, again, other = sampled(42), sampled(42), sampled(7)
    assert first.choices[0].message.content == again.choices[0].message.content
    assert first.choices[0].message.content != other.choices[0].message.content


@pytest.mark.parametrize("kwargs, param", [
    ({"temperature": 3}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"messages": []}, "messages"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
])
def test_invalid_fields_get_400_naming_the_field(client, kwargs, param):
    arguments = {"model": MODEL, "messages": FRANCE, **kwargs}
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(**arguments)
    body = error.value.body
    assert error.value.status_code == 400 and body["param"] == param and body["type"] == "invalid_request_error"


def test_context_overflow_and_unknown_model(client):
    with pytest.raises(openai.BadRequestError) as error:
        client.completions.create(model=MODEL, prompt="hello " * 9000, max_tokens=5)
    assert "8192" in error.value.body["message"] and error.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as error:
        chat(client, max_tokens=9000)
    assert "9000" in error.value.body["message"]
    with pytest.raises(openai.NotFoundError) as error:
        client.chat.completions.create(model="gpt-17", messages=FRANCE)
    assert error.value.body["code"] == "model_not_found" and MODEL in error.value.body["message"]


def test_raw_http_errors_keep_the_openai_shape(base_url, client):
    cases = [
        httpx.post(f"{base_url}/v1/chat/completions", content=b"{not json",
                   headers={"content-type": "application/json"}),
        httpx.post(f"{base_url}/v1/chat/completions", json={"model": MODEL, "messages": FRANCE, "max_tokens": "many"}),
        httpx.post(f"{base_url}/v1/completions", json={"model": MODEL}),
        httpx.get(f"{base_url}/v1/nothing-here"),
    ]
    assert [r.status_code for r in cases] == [400, 400, 400, 404]
    for response in cases:
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
        assert response.headers["x-request-id"]
    assert cases[1].json()["error"]["param"] == "max_tokens"
    assert cases[2].json()["error"]["param"] == "prompt"
    assert "Paris" in chat(client).choices[0].message.content


def test_disconnect_mid_stream_frees_the_slot(base_url):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Write a very long essay about rivers."}],
            "max_tokens": 2000, "stream": True, "temperature": 0}
    with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=body, timeout=60) as response:
        chunks = (line for line in response.iter_lines() if line.startswith("data:"))  # not keep-alive comments
        assert len([chunk for chunk, _ in zip(chunks, range(3))]) == 3
        state = health(base_url)
        assert state["running"] == 1
    wait_until_quiet(base_url, state["steps"])


def test_non_stream_disconnect_cancels_too(base_url):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Write a very long essay about mountains."}],
            "max_tokens": 2000, "temperature": 0}
    wait_until_quiet(base_url, leave_once_running(base_url, "/v1/chat/completions", json=body))


def test_new_request_streams_while_a_long_one_decodes(async_client):
    async def scenario():
        long_done = asyncio.Event()
        long_chunks = 0

        async def long_request():
            nonlocal long_chunks
            stream = await async_client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "Write a long essay about the sea."}],
                max_tokens=200, temperature=0, stream=True)
            async for _ in stream:
                long_chunks += 1
            long_done.set()

        task = asyncio.create_task(long_request())
        while long_chunks < 5:
            await asyncio.sleep(0.01)
        short = await async_client.chat.completions.create(model=MODEL, messages=FRANCE, max_tokens=5, temperature=0)
        joined_while_running = not long_done.is_set()
        await task
        return joined_while_running, short

    joined_while_running, short = asyncio.run(scenario())
    assert joined_while_running and short.usage.completion_tokens == 5


PROMPTS = [
    "What is the capital of France?", "Name three colors.", "Write a haiku about snow.", "What is 12 times 12?",
    "Who painted the Mona Lisa?", "Describe a cat in one sentence.", "List two prime numbers.",
    "What is the boiling point of water?", "Say hello in Spanish.", "What is the largest planet?",
    "Give me a synonym for happy.", "What do bees make?", "How many legs does a spider have?",
    "What color is the sky on a clear day?", "Translate 'thank you' to French.", "What is photosynthesis?",
]


def test_sixteen_concurrent_prompts_equal_their_alone_text(async_client):
    async def ask(prompt):
        response = await async_client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": prompt}], max_tokens=24, temperature=0)
        return response.choices[0].message.content

    async def scenario():
        together = await asyncio.gather(*(ask(p) for p in PROMPTS))
        alone = [await ask(p) for p in PROMPTS]
        return together, alone

    together, alone = asyncio.run(scenario())
    assert len(set(alone)) == len(PROMPTS)
    assert together == alone


def test_sse_wire_format(base_url):
    body = {"model": MODEL, "messages": FRANCE, "max_tokens": 3, "stream": True, "temperature": 0}
    with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=body) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    events = [line.removeprefix("data: ") for line in lines if not line.startswith(":")]  # keep-alive comments aside
    assert all(line.startswith("data: ") or line == ": keep-alive" for line in lines)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length" and chunks[-1]["choices"][0]["delta"] == {}
