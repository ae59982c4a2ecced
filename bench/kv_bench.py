"""KV memory benchmark (issue 9), three parts on the real server with the embedded model, one at a time:

- multi-turn: TTFT of the next turn of a chat with ~2,000 tokens of history, with and without prefix caching;
- interference: 8 streams decoding when one 3,000-token prompt arrives; the longest gap between two chunks
  of the running streams against their median gap, with chunked prefill and with the whole prompt at once;
- memory: peak RSS while 16 requests of 6,000 tokens each are offered under a 1 GiB KV budget.

    python -m bench.kv_bench                       # all three
    python -m bench.kv_bench --parts multi-turn    # one of them
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import functools
import json
import os
import platform
import statistics
import time
from pathlib import Path

import httpx
import transformers

from bench.run_all import DEFAULT_MKL_CBWR, RESULTS, process_env
from config import Config
from converters.gguf import cached_gguf_conversion
from model_manager import embedded_gguf_path
from tests.helpers.server_process import running_server

MODEL = "SmolLM2-135M-Instruct"
PARTS = ("multi-turn", "interference", "memory")
TOPICS = ("rivers", "castles", "bridges", "forests", "harbours", "mountains", "markets", "libraries")


@functools.cache
def tokenizer() -> transformers.PreTrainedTokenizerBase:
    return transformers.AutoTokenizer.from_pretrained(
        cached_gguf_conversion(embedded_gguf_path(), Path(Config().model_cache_dir)))


def text_of_tokens(tokens: int, seed: int) -> str:
    """Plain English of about `tokens` tokens, different for each seed (so no two prompts share a prefix)."""
    encode = tokenizer().encode
    sentences, count, index = [], 0, 0
    while count < tokens:
        topic = TOPICS[(seed + index) % len(TOPICS)]
        sentence = f"Note {seed}.{index}: the {topic} of region {index * 7 + seed} were described in report {index}."
        sentences.append(sentence)
        count += len(encode(" " + sentence, add_special_tokens=False))
        index += 1
    return " ".join(sentences)


async def stream_chat(client: httpx.AsyncClient, messages: list[dict], max_tokens: int,
                      chunk_times: list[float] | None = None) -> dict:
    """Stream one chat completion; returns its text, TTFT, usage and (optionally) each chunk's arrival time."""
    body = {"model": MODEL, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    started, ttft, text, usage = time.perf_counter(), None, [], {}
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line.removeprefix("data: "))
            usage = event.get("usage") or usage
            for choice in event.get("choices") or []:
                if choice["delta"].get("content"):
                    now = time.perf_counter()
                    ttft = ttft if ttft is not None else now - started
                    text.append(choice["delta"]["content"])
                    if chunk_times is not None:
                        chunk_times.append(now)
    return {"text": "".join(text), "ttft": ttft, "usage": usage}


def client_for(url: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(None, connect=30.0),
                             limits=httpx.Limits(max_connections=40))


async def multi_turn(url: str) -> dict:
    """Three turns of ~650 tokens each build the history; the TTFT of a short fourth turn is the measurement."""
    async with client_for(url) as client:
        messages = [{"role": "system", "content": "You answer in one short sentence."}]
        questions = [f"{text_of_tokens(650, turn)} Summarise note {turn}.0." for turn in range(3)]
        for question in [*questions, "Which note was the longest?"]:
            messages.append({"role": "user", "content": question})
            result = await stream_chat(client, messages, max_tokens=16)
            messages.append({"role": "assistant", "content": result["text"]})
        details = result["usage"].get("prompt_tokens_details") or {}
        return {"ttft_s": result["ttft"], "prompt_tokens": result["usage"]["prompt_tokens"],
                "cached_tokens": details.get("cached_tokens", 0)}


async def interference(url: str) -> dict:
    """8 streams decode; a 3,000-token prompt arrives once they are flowing."""
    long_prompt = text_of_tokens(3000, 99)  # built first: the client must not be busy while it measures gaps
    async with client_for(url) as client:
        times: list[list[float]] = [[] for _ in range(8)]
        streams = [asyncio.create_task(stream_chat(
            client, [{"role": "user", "content": f"Write a very long story about {TOPICS[i]}."}], 300, times[i]))
            for i in range(8)]
        while min(len(t) for t in times) < 20:
            await asyncio.sleep(0.05)
        arrived = time.perf_counter()
        long = await stream_chat(client, [{"role": "user", "content": long_prompt}], 8)
        prefilled = arrived + long["ttft"]
        await asyncio.gather(*streams)
    gaps_before = [b - a for t in times for a, b in zip(t, t[1:]) if b < arrived]
    gaps_during = [b - a for t in times for a, b in zip(t, t[1:]) if b > arrived and a < prefilled]
    median = statistics.median(gaps_before)
    return {"long_prompt_ttft_s": long["ttft"], "median_gap_s": median, "longest_gap_s": max(gaps_during),
            "median_gap_during_s": statistics.median(gaps_during), "ratio": max(gaps_during) / median}


def peak_rss_bytes(pid: int) -> tuple[int, int]:
    """(current, peak) resident memory of a process."""
    fields = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024


async def memory(url: str, pid: int) -> dict:
    """16 requests of 6,000 prompt tokens each, all at once, under the budget the server was started with."""
    idle, _ = peak_rss_bytes(pid)
    texts = [text_of_tokens(5950, 200 + i) for i in range(16)]
    async with client_for(url) as client:
        started = time.perf_counter()
        results = await asyncio.gather(*(stream_chat(client, [{"role": "user", "content": text}], 16)
                                         for text in texts))
        wall = time.perf_counter() - started
    _, peak = peak_rss_bytes(pid)
    return {"idle_rss_gib": idle / 2**30, "peak_rss_gib": peak / 2**30, "completed": sum(bool(r["text"]) for r in
            results), "prompt_tokens": results[0]["usage"]["prompt_tokens"], "wall_s": wall}


def server_pid(url: str) -> int:
    port = url.rsplit(":", 1)[1]
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                command = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"main.py" in command and port.encode() in command:
                return int(entry)
    raise RuntimeError(f"no server process listening on port {port}")


def serve(*flags: str):
    return running_server(*flags, env=process_env(os.environ.get("MKL_CBWR", DEFAULT_MKL_CBWR)),
                          log_path=RESULTS / "kv_server.log")


def cpu_model() -> str:
    with open("/proc/cpuinfo") as cpuinfo:
        name = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), "?")
    return f"{name}, {os.cpu_count()} CPUs ({platform.machine()})"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Batchwise KV memory benchmark.")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, from {', '.join(PARTS)}")
    args = parser.parse_args(argv)
    parts = args.parts.split(",")
    RESULTS.mkdir(parents=True, exist_ok=True)
    lines = [f"# KV memory benchmark, {datetime.datetime.now().isoformat(timespec='seconds')}", "",
             f"CPU: {cpu_model()}", ""]
    if "multi-turn" in parts:
        rows = {}
        for label, flags in (("prefix caching", ()), ("--no-prefix-caching", ("--no-prefix-caching",))):
            with serve(*flags) as url:
                rows[label] = asyncio.run(multi_turn(url))
            print(label, rows[label], flush=True)
        ratio = rows["prefix caching"]["ttft_s"] / rows["--no-prefix-caching"]["ttft_s"]
        lines += ["## Multi-turn: TTFT of turn 4 (target: with caching at most 0.25x without)", "",
                  "| server | prompt tokens | cached tokens | TTFT (s) |", "|---|---|---|---|"]
        lines += [f"| {label} | {r['prompt_tokens']} | {r['cached_tokens']} | {r['ttft_s']:.2f} |"
                  for label, r in rows.items()]
        lines += ["", f"ratio: {ratio:.3f}x", ""]
    if "interference" in parts:
        rows = {}
        for label, flags in (("chunked prefill (default)", ()),
                             ("one chunk (--max-num-batched-tokens 4096)", ("--max-num-batched-tokens", "4096"))):
            with serve(*flags) as url:
                rows[label] = asyncio.run(interference(url))
            print(label, rows[label], flush=True)
        lines += ["## Interference: 8 streams decoding, a 3,000-token prompt arrives (target: longest gap at most "
                  "3x the median)", "",
                  "| server | long prompt TTFT (s) | median gap before (s) | median / longest gap during its "
                  "prefill (s) | longest / median before |", "|---|---|---|---|---|"]
        lines += [f"| {label} | {r['long_prompt_ttft_s']:.2f} | {r['median_gap_s']:.3f} | "
                  f"{r['median_gap_during_s']:.3f} / {r['longest_gap_s']:.3f} | {r['ratio']:.2f}x |"
                  for label, r in rows.items()]
        lines.append("")
    if "memory" in parts:
        with serve("--kv-cache-memory", "1GiB", "--continuous-batching-batch-size", "16") as url:
            result = asyncio.run(memory(url, server_pid(url)))
        print(result, flush=True)
        lines += ["## Memory: 16 requests of ~6,000 tokens at once under --kv-cache-memory 1GiB", "",
                  "| completed | prompt tokens each | RSS idle (GiB) | RSS peak (GiB) | peak - idle (GiB) | wall (s) |",
                  "|---|---|---|---|---|---|",
                  f"| {result['completed']}/16 | {result['prompt_tokens']} | {result['idle_rss_gib']:.2f} | "
                  f"{result['peak_rss_gib']:.2f} | {result['peak_rss_gib'] - result['idle_rss_gib']:.2f} | "
                  f"{result['wall_s']:.0f} |", ""]
    text = "\n".join(lines)
    (RESULTS / "kv_latest.md").write_text(text)
    print("\n" + text)


if __name__ == "__main__":
    main()
