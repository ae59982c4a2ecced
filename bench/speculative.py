"""Speculative decoding's benchmark, one command, one run: the same server with and without
`--speculative-config`, one server at a time, on three workloads: prompts whose answers quote their input
(bench.quoting_prompts) at one stream, bench.prompts' open-ended chat at one stream, and the same chat at 32
streams. Reports tokens/s, the ratio to the server without speculation, the draft acceptance rate and tokens per
verified row (from /metrics), and whether greedy answers are the same text.

    python -m bench.speculative
    python -m bench.speculative --server-args "--int8 true" --max-tokens 64
    python -m bench.speculative --speculative-config '{"method": "ngram", "num_speculative_tokens": 6}'
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import shlex
from dataclasses import dataclass
from typing import Callable

import httpx
from prometheus_client.parser import text_string_to_metric_families

from bench.load import make_client, run_level, served_model, stream_one
from bench.prompts import chat_messages, prompt_for
from bench.quoting_prompts import PROMPTS as QUOTING_PROMPTS
from bench.quoting_prompts import quoting_prompt
from bench.report import cpu_model
from bench.run_all import RESULTS, process_env
from tests.helpers.server_process import running_server

DEFAULT_SPECULATION = '{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 2}'
DRAFTED = "batchwise_spec_decode_draft_tokens_total"
ACCEPTED = "batchwise_spec_decode_accepted_tokens_total"
VERIFIED = "batchwise_spec_decode_verification_steps_total"  # a row checking its draft in a step


@dataclass(frozen=True)
class Workload:
    name: str
    prompt_of: Callable[[int], str]
    concurrency: int
    requests: int


WORKLOADS = (Workload("quoting, 1 stream", quoting_prompt, 1, len(QUOTING_PROMPTS)),
             Workload("chat, 1 stream", prompt_for, 1, 4),
             Workload("chat, 32 streams", prompt_for, 32, 64))


@dataclass
class Result:
    server: str
    workload: str
    tokens_per_s: float
    drafted: float
    accepted: float
    verified: float


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Batchwise with and without speculative decoding, side by side.")
    parser.add_argument("--server-args", default="", help="flags for both servers, e.g. '--int8 true'")
    parser.add_argument("--speculative-config", default=DEFAULT_SPECULATION)
    parser.add_argument("--max-tokens", type=int, default=128)
    return parser.parse_args(argv)


async def counters(client: httpx.AsyncClient) -> dict[str, float]:
    """The speculation counters in /metrics (zero where the server has none)."""
    values = {name: 0.0 for name in (DRAFTED, ACCEPTED, VERIFIED)}
    for family in text_string_to_metric_families((await client.get("/metrics")).text):
        for sample in family.samples:
            if sample.name in values:
                values[sample.name] += sample.value
    return values


async def greedy_answers(client: httpx.AsyncClient, model: str, max_tokens: int) -> list[str]:
    answers = []
    for prompt in QUOTING_PROMPTS:
        response = await client.post("/v1/chat/completions", json={
            "model": model, "messages": chat_messages(prompt), "max_tokens": max_tokens, "temperature": 0})
        response.raise_for_status()
        answers.append(response.json()["choices"][0]["message"]["content"])
    return answers


async def measure(base_url: str, server: str, max_tokens: int) -> tuple[list[Result], list[str]]:
    async with make_client(base_url, max(w.concurrency for w in WORKLOADS)) as client:
        model = await served_model(client)
        await stream_one(client, model, prompt_for(0), max_tokens=4)
        answers = await greedy_answers(client, model, max_tokens)
        results = []
        for workload in WORKLOADS:
            before = await counters(client)
            label = f"{server}, {workload.name}"
            measurement = await run_level(client, model, workload.concurrency, workload.requests, max_tokens, label,
                                          prompt_of=workload.prompt_of)
            after = await counters(client)
            print(f"{label}: {measurement.tokens_per_s:.1f} tokens/s", flush=True)
            results.append(Result(server, workload.name, measurement.tokens_per_s,
                                  *(after[name] - before[name] for name in (DRAFTED, ACCEPTED, VERIFIED))))
        return results, answers


def run_server(server: str, argv: list[str], max_tokens: int) -> tuple[list[Result], list[str]]:
    log_path = RESULTS / f"server-speculative-{server}.log"
    print(f"server: main.py {shlex.join(argv)} (log: {log_path})", flush=True)
    with running_server(*argv, env=process_env(os.environ.get("MKL_CBWR", "AUTO")), log_path=log_path) as url:
        return asyncio.run(measure(url, server, max_tokens))


def report(args: argparse.Namespace, plain: list[Result], speculative: list[Result], same: int) -> str:
    lines = [f"# Speculative decoding, {datetime.datetime.now().isoformat(timespec='seconds')}", "",
             f"- {cpu_model()}, {os.cpu_count()} CPUs; flags for both: `{args.server_args}`; "
             f"speculation: `{args.speculative_config}`; {args.max_tokens} tokens per request, temperature 0",
             f"- greedy answers to the {len(QUOTING_PROMPTS)} quoting prompts the same text: {same} of "
             f"{len(QUOTING_PROMPTS)}", "",
             "| workload | without: tokens/s | with: tokens/s | ratio | drafts accepted | tokens per verified row |",
             "|---|---|---|---|---|---|"]
    for base, spec in zip(plain, speculative):
        accepted = f"{spec.accepted / spec.drafted:.0%}" if spec.drafted else "no drafts"
        per_row = f"{1 + spec.accepted / spec.verified:.2f}" if spec.verified else "n/a"
        lines.append(f"| {base.workload} | {base.tokens_per_s:.1f} | {spec.tokens_per_s:.1f} | "
                     f"{spec.tokens_per_s / base.tokens_per_s:.2f}x | {accepted} | {per_row} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    RESULTS.mkdir(parents=True, exist_ok=True)
    flags = shlex.split(args.server_args) + ["--continuous-batching-batch-size", "32"]
    plain, plain_answers = run_server("plain", flags, args.max_tokens)
    speculative, answers = run_server("speculative", flags + ["--speculative-config", args.speculative_config],
                                      args.max_tokens)
    same = sum(a == b for a, b in zip(plain_answers, answers))
    text = report(args, plain, speculative, same)
    (RESULTS / "speculative.md").write_text(text)
    (RESULTS / "speculative-answers.json").write_text(json.dumps({"plain": plain_answers, "speculative": answers},
                                                                 indent=1))
    print("\n" + text, flush=True)


if __name__ == "__main__":
    main()
