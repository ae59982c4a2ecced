"""Full benchmark: start the server, run the load levels, stop it, then run the generate() baselines
in their own process (never at the same time: both are CPU-bound), and print one markdown table.

    python -m bench.run_all                      # levels 1, 8, 32; 128 tokens each
    python -m bench.run_all --quick              # smoke test: levels 1, 4; 16 tokens; tiny baseline
    python -m bench.run_all --server-args "--torch-dtype bfloat16"
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

from bench.load import parse_levels, run_levels
from bench.report import markdown_table, short_completion_notes
from bench.stats import Measurement
from tests.helpers.server_process import running_server

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
SERVER_DEFAULT_BATCH_SIZE = 20
BATCH_SIZE_FLAG = "--continuous-batching-batch-size"
DEFAULT_MKL_CBWR = "AUTO,STRICT"  # what main.py sets when the environment does not


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Batchwise load benchmark against generate() baselines.")
    parser.add_argument("--levels", type=parse_levels, help="concurrency levels, e.g. '1,8,32' (default 1,8,32)")
    parser.add_argument("--max-tokens", type=int, help="completion tokens per request (default 128)")
    parser.add_argument("--requests-per-level", type=int, default=2, help="requests per level = this x concurrency")
    parser.add_argument("--server-args", default="", help="extra flags for main.py, e.g. '--torch-dtype bfloat16'")
    parser.add_argument("--sequential-prompts", type=int, help="prompts for sequential generate (default 4)")
    parser.add_argument("--static-batch-size", type=int, help="batch for static-batch generate (default 32)")
    parser.add_argument("--baseline-mkl-cbwr", help="MKL_CBWR for the baseline process (default: the server's)")
    parser.add_argument("--skip-baseline", action="store_true", help="server levels only")
    parser.add_argument("--quick", action="store_true", help="smoke test: levels 1,4; 16 tokens; tiny baseline")
    args = parser.parse_args(argv)
    apply_defaults(args)
    return args


def apply_defaults(args: argparse.Namespace) -> None:
    quick = {"levels": [1, 4], "max_tokens": 16, "sequential_prompts": 2, "static_batch_size": 4}
    full = {"levels": [1, 8, 32], "max_tokens": 128, "sequential_prompts": 4, "static_batch_size": 32}
    for name, value in (quick if args.quick else full).items():
        if getattr(args, name) is None:
            setattr(args, name, value)


def server_argv(args: argparse.Namespace) -> list[str]:
    """The user's server flags, plus a batch size large enough that the top level is decoded as one batch."""
    extra = shlex.split(args.server_args)
    if not any(a == BATCH_SIZE_FLAG or a.startswith(BATCH_SIZE_FLAG + "=") for a in extra):
        extra += [BATCH_SIZE_FLAG, str(max(SERVER_DEFAULT_BATCH_SIZE, *args.levels))]
    return extra


def flag_value(argv: list[str], flag: str) -> str | None:
    for index, arg in enumerate(argv):
        if arg == flag and index + 1 < len(argv):
            return argv[index + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def server_labels(levels: list[int], batch_size: str) -> dict[int, str]:
    return {level: f"server, concurrency {level} (batch size {batch_size})" for level in levels}


def run_server(args: argparse.Namespace, argv: list[str], env: dict[str, str]) -> list[Measurement]:
    log_path = RESULTS / "server.log"
    print(f"server: main.py {shlex.join(argv)} (log: {log_path})", flush=True)
    with running_server(*argv, env=env, log_path=log_path) as base_url:
        labels = server_labels(args.levels, flag_value(argv, BATCH_SIZE_FLAG) or str(SERVER_DEFAULT_BATCH_SIZE))
        return asyncio.run(run_levels(base_url, args.levels, args.max_tokens, args.requests_per_level, labels))


def run_baseline(args: argparse.Namespace, argv: list[str], env: dict[str, str]) -> list[Measurement]:
    output = RESULTS / "baseline.json"
    command = [sys.executable, "-m", "bench.baseline", "--server-args", shlex.join(argv),
               "--sequential-prompts", str(args.sequential_prompts), "--batch-size", str(args.static_batch_size),
               "--max-new-tokens", str(args.max_tokens), "--output", str(output)]
    print(f"baseline: MKL_CBWR={env['MKL_CBWR']}: {shlex.join(command)}", flush=True)
    subprocess.run(command, cwd=ROOT, env=env, check=True)
    result = json.loads(output.read_text())
    return [Measurement.from_json(m) for m in result["measurements"]]


def process_env(mkl_cbwr: str) -> dict[str, str]:
    env = dict(os.environ, MKL_CBWR=mkl_cbwr)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


def report(args: argparse.Namespace, argv: list[str], server: list[Measurement], baselines: list[Measurement],
           server_mkl: str, baseline_mkl: str | None) -> str:
    sequential, static_batch = baselines if baselines else (None, None)
    lines = [
        f"# Batchwise benchmark, {datetime.datetime.now().isoformat(timespec='seconds')}",
        "",
        f"- server flags: `{shlex.join(argv)}`; MKL_CBWR={server_mkl}",
        f"- baseline MKL_CBWR={baseline_mkl}" if baseline_mkl else "- baseline: skipped",
        f"- {args.max_tokens} completion tokens per request, streaming, temperature 0; "
        f"{args.requests_per_level} x concurrency requests per level; {os.cpu_count()} CPUs",
        "- target (issue): at concurrency 32, at least 6x sequential generate and at least 0.8x "
        "static-batch generate@32 in completion tokens/s",
        "",
        markdown_table(server, sequential, static_batch),
    ]
    notes = short_completion_notes(server + baselines)
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    RESULTS.mkdir(parents=True, exist_ok=True)
    server_args = server_argv(args)
    server_mkl = os.environ.get("MKL_CBWR", DEFAULT_MKL_CBWR)
    baseline_mkl = None if args.skip_baseline else (args.baseline_mkl_cbwr or server_mkl)
    server = run_server(args, server_args, process_env(server_mkl))
    baselines = [] if baseline_mkl is None else run_baseline(args, server_args, process_env(baseline_mkl))
    text = report(args, server_args, server, baselines, server_mkl, baseline_mkl)
    (RESULTS / "latest.md").write_text(text)
    print("\n" + text, flush=True)
    print(f"written to {RESULTS / 'latest.md'}")


if __name__ == "__main__":
    main()
