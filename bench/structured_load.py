"""What structured outputs cost under load: the same streaming load at each concurrency level, first free,
then with every other request held to a JSON schema (a token mask per constrained row on the batched
sampler), on one server in one run.

    python -m bench.structured_load [--levels 8,32] [--max-tokens 128] [--server-args "..."]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex

from bench.load import make_client, parse_levels, run_level, served_model, stream_one
from bench.prompts import prompt_for
from bench.run_all import DEFAULT_MKL_CBWR, RESULTS, cpu_model, process_env
from bench.stats import Measurement
from tests.helpers.server_process import running_server

# Long enough that constrained rows run to the token limit like free ones: the comparison is per token.
SCHEMA = {"type": "object", "properties": {
    "title": {"type": "string", "maxLength": 60},
    "sections": {"type": "array", "items": {"type": "object", "properties": {
        "heading": {"type": "string", "maxLength": 60}, "points": {"type": "array", "items": {"type": "string"}}},
        "required": ["heading", "points"], "additionalProperties": False}}},
    "required": ["title", "sections"], "additionalProperties": False}
RESPONSE_FORMAT = {"response_format": {"type": "json_schema", "json_schema": {"name": "outline", "schema": SCHEMA}}}


def half_constrained(index: int) -> dict | None:
    return RESPONSE_FORMAT if index % 2 == 0 else None


async def measure(base_url: str, levels: list[int], max_tokens: int, requests_per_level: int
                  ) -> list[tuple[Measurement, Measurement]]:
    async with make_client(base_url, max(levels)) as client:
        model = await served_model(client)
        await stream_one(client, model, prompt_for(0), 4, RESPONSE_FORMAT)  # the schema compiles once, off the clock
        pairs = []
        for concurrency in levels:
            requests = requests_per_level * concurrency
            free = await run_level(client, model, concurrency, requests, max_tokens, f"free, concurrency {concurrency}")
            half = await run_level(client, model, concurrency, requests, max_tokens,
                                   f"half JSON schema, concurrency {concurrency}", half_constrained)
            print(f"concurrency {concurrency}: free {free.tokens_per_s:.1f} tok/s, half constrained "
                  f"{half.tokens_per_s:.1f} tok/s ({half.tokens_per_s / free.tokens_per_s:.2f}x)", flush=True)
            pairs.append((free, half))
        return pairs


def report(pairs: list[tuple[Measurement, Measurement]], args: argparse.Namespace) -> str:
    lines = [f"- {cpu_model()}, {os.cpu_count()} CPUs; {args.max_tokens} tokens per request, streaming, "
             f"temperature 0; extra server flags: `{args.server_args}`", "",
             "| concurrency | free tok/s | half constrained tok/s | ratio | tokens per request, free / half | failed |",
             "|---|---|---|---|---|---|"]
    for free, half in pairs:
        lines.append(f"| {free.concurrency} | {free.tokens_per_s:.1f} | {half.tokens_per_s:.1f} | "
                     f"{half.tokens_per_s / free.tokens_per_s:.2f} | {free.completion_tokens / free.requests:.0f} / "
                     f"{half.completion_tokens / half.requests:.0f} | {free.failed + half.failed} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--levels", type=parse_levels, default=[8, 32])
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--requests-per-level", type=int, default=2)
    parser.add_argument("--server-args", default="")
    args = parser.parse_args(argv)
    RESULTS.mkdir(parents=True, exist_ok=True)
    argv_server = ["--continuous-batching-batch-size", str(max(args.levels)), *shlex.split(args.server_args)]
    with running_server(*argv_server, env=process_env(os.environ.get("MKL_CBWR", DEFAULT_MKL_CBWR)),
                        log_path=RESULTS / "server-structured.log") as base_url:
        pairs = asyncio.run(measure(base_url, args.levels, args.max_tokens, args.requests_per_level))
    table = report(pairs, args)
    (RESULTS / "structured.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
