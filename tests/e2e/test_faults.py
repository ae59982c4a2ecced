"""Fault isolation through the real server, with failpoints set by BATCHWISE_FAILPOINTS: poisoned requests
fail alone with an error in OpenAI's shape while eight streams beside them finish with their alone text; a
hung step turns /health 503 and the process exits non-zero."""

import asyncio
import subprocess

import httpx
import openai
import pytest

from tests.helpers.server_process import free_port, main_command, running_server, spawn, wait_healthy

pytestmark = pytest.mark.e2e

MODEL = "SmolLM2-135M-Instruct"
TOPICS = ["rivers", "bread", "owls", "glass", "trains", "tea", "chess", "snow"]


def ask(topic: str) -> list[dict]:
    return [{"role": "user", "content": f"Write one sentence about {topic}."}]


async def stream_text(client: openai.AsyncOpenAI, topic: str, user: str | None = None,
                      first_text: asyncio.Event | None = None) -> str:
    """The streamed reply; `first_text` is set when its first text arrives (its sequence has sampled a token, so
    it is decoding and stays in the running batch until its last token), or when it ends without any."""
    stream = await client.chat.completions.create(model=MODEL, messages=ask(topic), max_tokens=16, temperature=0,
                                                  stream=True, **({"user": user} if user else {}))
    pieces = []
    try:
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                pieces.append(chunk.choices[0].delta.content)
                if first_text is not None:
                    first_text.set()
    finally:
        if first_text is not None:
            first_text.set()
    return "".join(pieces)


async def failure(client: openai.AsyncOpenAI, topic: str, user: str, stream: bool) -> openai.APIError:
    with pytest.raises(openai.APIError) as raised:
        if stream:
            await stream_text(client, topic, user)
        else:
            await client.chat.completions.create(model=MODEL, messages=ask(topic), max_tokens=16, temperature=0,
                                                 user=user)
    return raised.value


def test_poisoned_requests_fail_alone_and_the_server_keeps_serving(embedded_model_dir, tmp_path):
    failpoints = "decode:poison:error,prefill:bad:error,prefill:big:oom"
    log = tmp_path / "server.log"
    with running_server("--continuous-batching-batch-size", "16", "--batch-invariant", "true",
                        env={"BATCHWISE_FAILPOINTS": failpoints}, log_path=log) as url:
        async def scenario():
            client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="-", max_retries=0)
            alone = [await stream_text(client, topic) for topic in TOPICS]

            # A failing row is found and fails alone however the requests happen to share steps.
            results = await asyncio.gather(
                *(stream_text(client, topic) for topic in TOPICS),
                failure(client, "lamps", "poison", stream=True), failure(client, "lamps", "bad", stream=False))
            assert list(results[:len(TOPICS)]) == alone
            for error in results[len(TOPICS):]:
                assert "the engine failed while generating this response" in str(error)

            # Running out of memory preempts rows only in a step of several rows (Engine._shed_rows; a row alone
            # just fails), so the big request is sent once all eight streams are decoding: Scheduler.plan gives
            # every decoding row a span in every step and they still have most of their 16 tokens to go, so the
            # big prompt's first step holds them, and its newest half (the big request among it) is preempted. The
            # big request fails only later, alone, once no other row is left to run beside it.
            first_texts = [asyncio.Event() for _ in TOPICS]
            beside = [asyncio.create_task(stream_text(client, topic, first_text=first_text))
                      for topic, first_text in zip(TOPICS, first_texts)]
            await asyncio.gather(*(first_text.wait() for first_text in first_texts))
            error = await failure(client, "lamps", "big", stream=True)
            assert list(await asyncio.gather(*beside)) == alone
            assert "the engine failed while generating this response: out of memory running this request alone" \
                in str(error)

            assert await stream_text(client, TOPICS[0]) == alone[0]

        asyncio.run(scenario())
        assert httpx.get(f"{url}/health").status_code == 200
    text = log.read_text()
    assert "failpoints are set" in text and "out of memory in a step" in text and "preempted requests" in text


def start_server(*args: str, log_path, env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    port = free_port()
    return spawn(main_command(port, *args), log_path, env), f"http://127.0.0.1:{port}"


def test_a_hung_step_turns_health_503_and_the_process_exits_non_zero(embedded_model_dir, tmp_path):
    log = tmp_path / "server.log"
    process, url = start_server("--step-timeout", "2", env={"BATCHWISE_FAILPOINTS": "decode:stuck:hang"},
                                log_path=log)
    try:
        wait_healthy(url, process, log)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="-", max_retries=0)
        with pytest.raises(openai.APIError, match="step timeout of 2 s"):
            client.chat.completions.create(model=MODEL, messages=ask("clocks"), max_tokens=8, user="stuck")
        health = httpx.get(f"{url}/health").json()
        assert health["status"] == "error" and "step timeout" in health["error"]
        assert process.wait(timeout=30) != 0
    finally:
        process.kill()
    assert "exiting" in log.read_text()


def test_a_server_that_cannot_start_its_engine_says_why_and_exits_non_zero(embedded_model_dir, tmp_path):
    log = tmp_path / "server.log"
    process, _ = start_server("--failpoints", "decode:x", log_path=log)
    try:
        assert process.wait(timeout=120) != 0
    finally:
        process.kill()
    assert "failpoint 'decode:x' is not STAGE:USER:KIND" in log.read_text()
