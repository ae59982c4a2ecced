"""Speculative decoding's benchmark, one command, one run: the same server with and without
`--speculative-config`, both running, on three workloads: prompts whose answers quote their input
(bench.quoting_prompts) at one stream, bench.prompts' open-ended chat at one stream, and the same chat at 32
streams. Each workload runs `--rounds` times on each server, the two servers taking turns (one loaded at a time,
which goes first alternating), so that a shared machine's drift falls on both; rounds after the first find the
same prompts in both servers' prefix caches. Reports tokens/s (over all rounds), the ratio to the server
without speculation with its lowest and highest round, the draft acceptance rate and tokens per verified row
(from /metrics), and whether greedy answers are the same text.

    python -m bench.speculative
    python -m bench.speculative --server-args "--int8 true" --max-tokens 64 --rounds 1
    python -m bench.speculative --speculative-config '{"method": "ngram", "num_speculative_tokens": 6}'
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import shlex
from dataclasses import dataclass, field
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
    """One server's rounds of one workload, summed."""
    server: str
    workload: str
    tokens: int = 0
    seconds: float = 0.0
    round_rates: list[float] = field(default_factory=list)  # tokens/s of each round
    drafted: float = 0.0
    accepted: float = 0.0
    verified: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


def positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"a whole number of at least 1, not {text!r}")
    return int(text)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Batchwise with and without speculative decoding, side by side.")
    parser.add_argument("--server-args", default="", help="flags for both servers, e.g. '--int8 true'")
    parser.add_argument("--speculative-config", default=DEFAULT_SPECULATION)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=positive, default=3, help="times each workload runs on each server, in turn")
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


@dataclass
class Server:
    name: str
    client: httpx.AsyncClient
    model: str


async def ready(name: str, base_url: str, max_tokens: int, stack: contextlib.AsyncExitStack
                ) -> tuple[Server, list[str]]:
    """The server's client, warmed up, and its greedy answers to the quoting prompts."""
    client = await stack.enter_async_context(make_client(base_url, max(w.concurrency for w in WORKLOADS)))
    model = await served_model(client)
    await stream_one(client, model, prompt_for(0), max_tokens=4)
    return Server(name, client, model), await greedy_answers(client, model, max_tokens)


async def measure_round(server: Server, workload: Workload, max_tokens: int, result: Result) -> None:
    before = await counters(server.client)
    label = f"{server.name}, {workload.name}"
    measurement = await run_level(server.client, server.model, workload.concurrency, workload.requests, max_tokens,
                                  label, prompt_of=workload.prompt_of)
    after = await counters(server.client)
    print(f"{label}: {measurement.tokens_per_s:.1f} tokens/s", flush=True)
    result.tokens += measurement.completion_tokens
    result.seconds += measurement.wall_s
    result.round_rates.append(measurement.tokens_per_s)
    result.drafted += after[DRAFTED] - before[DRAFTED]
    result.accepted += after[ACCEPTED] - before[ACCEPTED]
    result.verified += after[VERIFIED] - before[VERIFIED]


async def measure(urls: dict[str, str], max_tokens: int, rounds: int
                  ) -> tuple[dict[str, list[Result]], dict[str, list[str]]]:
    """Each workload's rounds on every server in turn; each server's results and greedy answers."""
    async with contextlib.AsyncExitStack() as stack:
        servers, answers = [], {}
        for name, url in urls.items():
            server, answers[name] = await ready(name, url, max_tokens, stack)
            servers.append(server)
        results = {server.name: [Result(server.name, workload.name) for workload in WORKLOADS] for server in servers}
        for index, workload in enumerate(WORKLOADS):
            for round_ in range(rounds):
                for server in servers if round_ % 2 == 0 else reversed(servers):  # A B B A: neither always first
                    await measure_round(server, workload, max_tokens, results[server.name][index])
        return results, answers


def report(args: argparse.Namespace, plain: list[Result], speculative: list[Result], same: int) -> str:
    lines = [f"# Speculative decoding, {datetime.datetime.now().isoformat(timespec='seconds')}", "",
             f"- {cpu_model()}, {os.cpu_count()} CPUs; flags for both: `{args.server_args}`; "
             f"speculation: `{args.speculative_config}`; {args.max_tokens} tokens per request, temperature 0; "
             f"{args.rounds} rounds, the servers taking turns",
             f"- greedy answers to the {len(QUOTING_PROMPTS)} quoting prompts the same text: {same} of "
             f"{len(QUOTING_PROMPTS)}", "",
             "| workload | without: tokens/s | with: tokens/s | ratio (rounds' lowest-highest) | drafts accepted | "
             "tokens per verified row |",
             "|---|---|---|---|---|---|"]
    for base, spec in zip(plain, speculative):
        accepted = f"{spec.accepted / spec.drafted:.0%}" if spec.drafted else "no drafts"
        per_row = f"{1 + spec.accepted / spec.verified:.2f}" if spec.verified else "n/a"
        ratios = [with_drafts / without for with_drafts, without in zip(spec.round_rates, base.round_rates)]
        lines.append(f"| {base.workload} | {base.tokens_per_s:.1f} | {spec.tokens_per_s:.1f} | "
                     f"{spec.tokens_per_s / base.tokens_per_s:.2f}x ({min(ratios):.2f}-{max(ratios):.2f}) | "
                     f"{accepted} | {per_row} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    RESULTS.mkdir(parents=True, exist_ok=True)
    flags = shlex.split(args.server_args) + ["--continuous-batching-batch-size", "32"]
    arguments = {"plain": flags, "speculative": flags + ["--speculative-config", args.speculative_config]}
    with contextlib.ExitStack() as stack:
        urls = {}
        for name, argv in arguments.items():
            log_path = RESULTS / f"server-speculative-{name}.log"
            print(f"server: main.py {shlex.join(argv)} (log: {log_path})", flush=True)
            urls[name] = stack.enter_context(running_server(
                *argv, env=process_env(os.environ.get("MKL_CBWR", "AUTO")), log_path=log_path))
        results, answers = asyncio.run(measure(urls, args.max_tokens, args.rounds))
    same = sum(a == b for a, b in zip(answers["plain"], answers["speculative"]))
    text = report(args, results["plain"], results["speculative"], same)
    (RESULTS / "speculative.md").write_text(text)
    (RESULTS / "speculative-answers.json").write_text(json.dumps(answers, indent=1))
    print("\n" + text, flush=True)


if __name__ == "__main__":
    main()
