"""Streaming load generator for a running Batchwise server: each level keeps `concurrency` chat
requests in flight and measures TTFT, latency and completion tokens/s from real usage counts.

Standalone: python -m bench.load --url http://127.0.0.1:7088 --levels 1 8 32
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from dataclasses import dataclass
from typing import Callable

import httpx

from bench.prompts import chat_messages, prompt_for
from bench.report import markdown_table
from bench.stats import Measurement

CHAT_PATH = "/v1/chat/completions"


@dataclass
class RequestResult:
    ttft_s: float | None
    latency_s: float
    completion_tokens: int
    error: str | None = None


def chat_body(model: str, prompt: str, max_tokens: int, extra: dict | None = None) -> dict:
    return {"model": model, "messages": chat_messages(prompt), "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}, **(extra or {})}


def has_content(event: dict) -> bool:
    return any(choice.get("delta", {}).get("content") for choice in event.get("choices") or [])


async def stream_one(client: httpx.AsyncClient, model: str, prompt: str, max_tokens: int,
                     extra: dict | None = None) -> RequestResult:
    started = time.perf_counter()
    ttft: float | None = None
    completion_tokens: int | None = None
    async with client.stream("POST", CHAT_PATH, json=chat_body(model, prompt, max_tokens, extra)) as response:
        if response.status_code != 200:
            body = (await response.aread()).decode(errors="replace")[:200]
            return RequestResult(None, time.perf_counter() - started, 0, f"HTTP {response.status_code}: {body}")
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            payload = line.removeprefix("data: ")
            if payload == "[DONE]":
                break
            event = json.loads(payload)
            if "error" in event:
                return RequestResult(ttft, time.perf_counter() - started, 0, event["error"].get("message"))
            if ttft is None and has_content(event):
                ttft = time.perf_counter() - started
            if event.get("usage"):
                completion_tokens = event["usage"]["completion_tokens"]
    latency = time.perf_counter() - started
    if completion_tokens is None:
        return RequestResult(ttft, latency, 0, "the stream ended without a usage chunk")
    return RequestResult(ttft, latency, completion_tokens)


async def run_level(client: httpx.AsyncClient, model: str, concurrency: int, requests: int, max_tokens: int,
                    label: str, extra_for: Callable[[int], dict | None] = lambda index: None,
                    prompt_of: Callable[[int], str] = prompt_for) -> Measurement:
    """`extra_for(index)`: fields added to that request's body (e.g. a response_format); `prompt_of(index)`: its
    prompt."""
    request_indices = iter(range(requests))
    results: list[RequestResult] = []

    async def worker() -> None:
        # workers share one iterator, so a finished request is replaced at once and `concurrency` stay in flight
        for index in request_indices:
            results.append(await stream_one(client, model, prompt_of(index), max_tokens, extra_for(index)))

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return summarise(label, results, time.perf_counter() - started, max_tokens, concurrency)


def summarise(label: str, results: list[RequestResult], wall_s: float, max_tokens: int,
              concurrency: int) -> Measurement:
    succeeded = [r for r in results if r.error is None]
    for error in sorted({r.error for r in results if r.error is not None}):
        print(f"  {label}: failed request: {error}", flush=True)
    return Measurement(configuration=label, requests=len(results),
                       completion_tokens=sum(r.completion_tokens for r in succeeded), wall_s=wall_s,
                       ttfts_s=[r.ttft_s for r in succeeded if r.ttft_s is not None],
                       latencies_s=[r.latency_s for r in succeeded], failed=len(results) - len(succeeded),
                       requested_tokens_each=max_tokens, concurrency=concurrency)


def make_client(base_url: str, concurrency: int) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    return httpx.AsyncClient(base_url=base_url, limits=limits, timeout=httpx.Timeout(None, connect=30.0))


async def served_model(client: httpx.AsyncClient) -> str:
    response = await client.get("/v1/models")
    response.raise_for_status()
    return response.json()["data"][0]["id"]


async def run_levels(base_url: str, levels: list[int], max_tokens: int, requests_per_level: int,
                     label_for: dict[int, str] | None = None, model: str | None = None) -> list[Measurement]:
    """Runs each level in turn after one short warm-up request; `requests_per_level` multiplies concurrency.
    `model` is the request's model field (default: the first the server lists)."""
    label_for = label_for or {}
    async with make_client(base_url, max(levels)) as client:
        model = model or await served_model(client)
        await stream_one(client, model, prompt_for(0), max_tokens=4)
        measurements = []
        for concurrency in levels:
            label = label_for.get(concurrency, f"server, concurrency {concurrency}")
            requests = requests_per_level * concurrency
            print(f"load: {label}: {requests} requests, {max_tokens} tokens each", flush=True)
            measurement = await run_level(client, model, concurrency, requests, max_tokens, label)
            print(f"load: {label}: {measurement.tokens_per_s:.1f} completion tokens/s", flush=True)
            measurements.append(measurement)
        return measurements


def parse_levels(text: str) -> list[int]:
    """Accepts '1,8,32' or '1 8 32'."""
    return [int(part) for part in text.replace(",", " ").split()]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Streaming load against a running Batchwise server.")
    parser.add_argument("--url", default="http://127.0.0.1:7088")
    parser.add_argument("--levels", type=parse_levels, default=[1, 8, 32], help="e.g. '1,8,32'")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--requests-per-level", type=int, default=2, help="requests per level = this x concurrency")
    args = parser.parse_args(argv)
    measurements = asyncio.run(run_levels(args.url, args.levels, args.max_tokens, args.requests_per_level))
    print(markdown_table(measurements, sequential=None, static_batch=None, baselines=[]))


if __name__ == "__main__":
    main()
