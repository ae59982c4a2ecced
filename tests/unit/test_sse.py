"""SSE keep-alive: while a stream is silent (a long prefill before the first token) it carries comment lines,
which the real openai SDK skips."""

import asyncio

import httpx
import openai
from fastapi import FastAPI

from api.sse import KEEPALIVE, sse, with_keepalive
from models import ChatChunkChoice, ChatCompletionChunk, ChatDelta

INTERVAL = 0.02


async def slow_then_fast(first_after: float, lines: list[str], closed: list[bool]):
    try:
        await asyncio.sleep(first_after)
        for line in lines:
            yield line
    finally:
        closed.append(True)


async def collect(stream) -> list[str]:
    return [line async for line in stream]


def test_comments_come_while_waiting_for_the_first_line_and_stop_after_it():
    closed = []
    got = asyncio.run(collect(with_keepalive(slow_then_fast(10 * INTERVAL, ["a", "b", "c"], closed), INTERVAL)))
    first = got.index("a")
    assert first >= 3 and set(got[:first]) == {KEEPALIVE}
    assert got[first:] == ["a", "b", "c"] and closed == [True]


def test_closing_the_stream_while_it_waits_closes_the_source():
    closed = []

    async def close_early():
        stream = with_keepalive(slow_then_fast(60, ["never"], closed), INTERVAL)
        assert await anext(stream) == KEEPALIVE
        await stream.aclose()

    asyncio.run(close_early())
    assert closed == [True]


def chunk(**delta) -> ChatCompletionChunk:
    return ChatCompletionChunk(id="chatcmpl-1", model="m", choices=[ChatChunkChoice(index=0, delta=ChatDelta(**delta))])


def slow_chat_app() -> FastAPI:
    async def chunks():
        yield chunk(role="assistant", content="")
        await asyncio.sleep(10 * INTERVAL)  # the prefill
        for word in ("Hello", " there"):
            yield chunk(content=word)

    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat():
        return sse(chunks(), "1", keepalive=INTERVAL)

    return app


def test_the_openai_sdk_streams_through_the_comments():
    transport = httpx.ASGITransport(app=slow_chat_app())

    async def stream_chat():
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            raw = await http.post("/v1/chat/completions", json={})
            client = openai.AsyncOpenAI(base_url="http://test/v1", api_key="-", http_client=http, max_retries=0)
            stream = await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}],
                                                          stream=True)
            return raw, "".join([c.choices[0].delta.content or "" async for c in stream])

    raw, text = asyncio.run(stream_chat())
    assert raw.headers["x-accel-buffering"] == "no" and KEEPALIVE in raw.text
    assert text == "Hello there"
