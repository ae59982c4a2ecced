"""Prefix caching on the real server: a multi-turn chat reuses the K/V of the turns before it, reports them as
usage.prompt_tokens_details.cached_tokens, and answers exactly as a server without the cache."""

import openai
import pytest

from tests.helpers.server_process import running_server

pytestmark = pytest.mark.e2e

MODEL = "SmolLM2-135M-Instruct"
QUESTIONS = ["Name three colours of the rainbow.", "Which of them is your favourite, and why?",
             "Say the same in one short sentence."]


def conversation(client) -> list[tuple[str, int, int]]:
    """(reply, prompt tokens, cached tokens) of each turn of a three-turn chat."""
    messages = [{"role": "system", "content": "You are a concise, friendly assistant."}]
    turns = []
    for question in QUESTIONS:
        messages.append({"role": "user", "content": question})
        response = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=40)
        reply = response.choices[0].message.content
        messages.append({"role": "assistant", "content": reply})
        usage = response.usage
        turns.append((reply, usage.prompt_tokens, usage.prompt_tokens_details.cached_tokens))
    return turns


def test_later_turns_reuse_the_earlier_ones_and_answer_as_without_the_cache(client, embedded_model_dir):
    cached = conversation(client)
    with running_server("--no-prefix-caching", "--batch-invariant", "true") as url:
        uncached = conversation(openai.OpenAI(base_url=f"{url}/v1", api_key="-", max_retries=0))
    assert [reply for reply, _, _ in cached] == [reply for reply, _, _ in uncached]
    assert [hits for _, _, hits in uncached] == [0, 0, 0]
    first, second, third = cached
    assert second[2] >= first[1] - 16, "turn 2 reuses (about) all of turn 1's prompt"
    assert third[2] >= second[1] - 16 and third[2] < third[1]
    assert all(hits % 16 == 0 for _, _, hits in cached), "reuse comes in whole 16-token blocks"
