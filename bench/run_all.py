"""Full benchmark, one command, one run: Batchwise in each speed configuration (eager, static cache +
torch.compile, HQQ int4 and int8, each also compiled), then `transformers serve --continuous-batching`, each streaming
128-token chat completions at concurrency 1, 8 and 32, one server at a time; sequential and static-batch
`model.generate` run in their own process before the servers and again after them (never at the same time:
all are CPU-bound), and ratios are taken against the faster of the two runs: a shared machine's speed drifts
within the hour. Prints one markdown table and draws tokens/s against concurrency
(bench/results/throughput.png).

    python -m bench.run_all                                   # everything above
    python -m bench.run_all --configs eager --no-transformers-serve
    python -m bench.run_all --quick                           # smoke test: levels 1, 4; 16 tokens
    python -m bench.run_all --server-args "--torch-dtype bfloat16"
    python -m bench.run_all --llama-cpp q8_0,bf16             # also llama.cpp's llama-server (bench/llama_cpp.py)
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

from bench.llama_cpp import GGUF_TYPES, running_llama_server
from bench.load import parse_levels, run_levels
from bench.plot import plot_throughput
from bench.report import cpu_model, markdown_table, short_completion_notes
from bench.stats import Measurement
from bench.transformers_serve import running_transformers_serve
from tests.helpers.server_process import running_server

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
SERVER_DEFAULT_BATCH_SIZE = 20
BATCH_SIZE_FLAG = "--continuous-batching-batch-size"
DEFAULT_MKL_CBWR = "AUTO"  # MKL's own choice, as main.py leaves it without --batch-invariant
SERVER_CONFIGS: dict[str, list[str]] = {
    "eager": ["--torch-compile", "false"],  # the default, auto, runs compiled once its steps are saved
    "static+compile": ["--torch-compile", "true"],  # compiling turns the static cache on
    "hqq": ["--hqq", "true"],
    "hqq+compile": ["--hqq", "true", "--torch-compile", "true"],
    "int8": ["--int8", "true"],
    "int8+compile": ["--int8", "true", "--torch-compile", "true"],
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Batchwise load benchmark against other servers and generate().")
    parser.add_argument("--configs", type=parse_configs, default=list(SERVER_CONFIGS),
                        help=f"comma-separated, among {', '.join(SERVER_CONFIGS)} (default all)")
    parser.add_argument("--no-transformers-serve", dest="transformers_serve", action="store_false",
                        help="skip `transformers serve --continuous-batching`")
    parser.add_argument("--llama-cpp", type=parse_gguf_types, default=[],
                        help=f"also llama.cpp's llama-server on GGUFs of these types ({','.join(GGUF_TYPES)}): built "
                             "and converted once, the first time (bench/llama_cpp.py)")
    parser.add_argument("--levels", type=parse_levels, help="concurrency levels, e.g. '1,8,32' (default 1,8,32)")
    parser.add_argument("--max-tokens", type=int, help="completion tokens per request (default 128)")
    parser.add_argument("--requests-per-level", type=int, default=2, help="requests per level = this x concurrency")
    parser.add_argument("--server-args", default="", help="flags for every main.py, e.g. '--torch-dtype bfloat16'")
    parser.add_argument("--sequential-prompts", type=int, help="prompts for sequential generate (default 4)")
    parser.add_argument("--static-batch-size", type=int, help="batch for static-batch generate (default 32)")
    parser.add_argument("--skip-baseline", action="store_true", help="no generate() baselines")
    parser.add_argument("--quick", action="store_true", help="smoke test: levels 1,4; 16 tokens; tiny baseline")
    args = parser.parse_args(argv)
    apply_defaults(args)
    return args


def chosen(text: str, choices, what: str) -> list[str]:
    """A comma-separated choice among `choices` (argparse's error naming them otherwise)."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in choices]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown {what} {', '.join(unknown)}; choose among {', '.join(choices)}")
    return names


def parse_configs(text: str) -> list[str]:
    return chosen(text, SERVER_CONFIGS, "configuration")


def parse_gguf_types(text: str) -> list[str]:
    return chosen(text.lower(), GGUF_TYPES, "GGUF type")


def apply_defaults(args: argparse.Namespace) -> None:
    quick = {"levels": [1, 4], "max_tokens": 16, "sequential_prompts": 2, "static_batch_size": 4}
    full = {"levels": [1, 8, 32], "max_tokens": 128, "sequential_prompts": 4, "static_batch_size": 32}
    for name, value in (quick if args.quick else full).items():
        if getattr(args, name) is None:
            setattr(args, name, value)


def server_argv(args: argparse.Namespace, config: str = "eager") -> list[str]:
    """The user's flags and the configuration's, plus a batch size large enough that the top level is decoded as
    one batch."""
    extra = shlex.split(args.server_args) + SERVER_CONFIGS[config]
    if not any(a == BATCH_SIZE_FLAG or a.startswith(BATCH_SIZE_FLAG + "=") for a in extra):
        extra += [BATCH_SIZE_FLAG, str(max(SERVER_DEFAULT_BATCH_SIZE, *args.levels))]
    return extra


def level_labels(name: str, levels: list[int]) -> dict[int, str]:
    return {level: f"{name}, concurrency {level}" for level in levels}


def run_batchwise(args: argparse.Namespace, config: str, env: dict[str, str]) -> list[Measurement]:
    argv = server_argv(args, config)
    log_path = RESULTS / f"server-{config.replace('+', '-')}.log"
    print(f"server: main.py {shlex.join(argv)} (log: {log_path})", flush=True)
    with running_server(*argv, env=env, log_path=log_path) as base_url:
        labels = level_labels(f"Batchwise {config}", args.levels)
        return asyncio.run(run_levels(base_url, args.levels, args.max_tokens, args.requests_per_level, labels))


def run_transformers_serve(args: argparse.Namespace, env: dict[str, str]) -> list[Measurement]:
    log_path = RESULTS / "transformers-serve.log"
    with running_transformers_serve(shlex.split(args.server_args), env, log_path) as (base_url, model):
        labels = level_labels("transformers serve --continuous-batching", args.levels)
        return asyncio.run(run_levels(base_url, args.levels, args.max_tokens, args.requests_per_level, labels,
                                      model=model))


def run_llama_cpp(args: argparse.Namespace, kind: str, env: dict[str, str]) -> list[Measurement]:
    log_path = RESULTS / f"llama-server-{kind}.log"
    with running_llama_server(shlex.split(args.server_args), kind, max(args.levels), env, log_path) as base_url:
        labels = level_labels(f"llama.cpp llama-server {kind.upper()}", args.levels)
        return asyncio.run(run_levels(base_url, args.levels, args.max_tokens, args.requests_per_level, labels))


def run_baseline(args: argparse.Namespace, env: dict[str, str], when: str) -> list[Measurement]:
    output = RESULTS / f"baseline-{when.replace(' ', '-')}.json"
    command = [sys.executable, "-m", "bench.baseline", "--server-args", args.server_args,
               "--sequential-prompts", str(args.sequential_prompts), "--batch-size", str(args.static_batch_size),
               "--max-new-tokens", str(args.max_tokens), "--output", str(output), "--when", when]
    print(f"baseline: {shlex.join(command)}", flush=True)
    subprocess.run(command, cwd=ROOT, env=env, check=True)
    result = json.loads(output.read_text())
    return [Measurement.from_json(m) for m in result["measurements"]]


def process_env(mkl_cbwr: str) -> dict[str, str]:
    env = dict(os.environ, MKL_CBWR=mkl_cbwr)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


def fastest(baselines: list[Measurement], kind: str) -> Measurement | None:
    return max((m for m in baselines if m.configuration.startswith(kind)), key=lambda m: m.tokens_per_s, default=None)


def report(args: argparse.Namespace, servers: list[Measurement], baselines: list[Measurement], mkl: str) -> str:
    sequential, static_batch = fastest(baselines, "sequential"), fastest(baselines, "static-batch")
    lines = [
        f"# Batchwise benchmark, {datetime.datetime.now().isoformat(timespec='seconds')}",
        "",
        f"- {cpu_model()}, {os.cpu_count()} CPUs; MKL_CBWR={mkl}; extra server flags: `{args.server_args}`",
        f"- {args.max_tokens} completion tokens per request, streaming, temperature 0; "
        f"{args.requests_per_level} x concurrency requests per level",
        "- ratios against the faster run of each baseline (they run before and after the servers)",
        "",
        markdown_table(servers, sequential, static_batch, baselines),
    ]
    notes = short_completion_notes(servers + baselines)
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    RESULTS.mkdir(parents=True, exist_ok=True)
    mkl = os.environ.get("MKL_CBWR", DEFAULT_MKL_CBWR)
    env = process_env(mkl)
    baselines = [] if args.skip_baseline else run_baseline(args, env, "before the servers")
    servers = [m for config in args.configs for m in run_batchwise(args, config, env)]
    if args.transformers_serve:
        servers += run_transformers_serve(args, env)
    for kind in args.llama_cpp:
        servers += run_llama_cpp(args, kind, env)
    if not args.skip_baseline:
        baselines += run_baseline(args, env, "after the servers")
    text = report(args, servers, baselines, mkl)
    (RESULTS / "latest.md").write_text(text)
    plotted = [m for m in (fastest(baselines, "sequential"), fastest(baselines, "static-batch")) if m]
    plot_throughput(servers, plotted, RESULTS / "throughput.png", cpu_model())
    print("\n" + text, flush=True)
    print(f"written to {RESULTS / 'latest.md'} and {RESULTS / 'throughput.png'}")


if __name__ == "__main__":
    main()
