"""Multi-LoRA's benchmark, one command, one run: what mixing adapters in one batch costs. 32 streams of 128-token
chat completions, each streaming its whole length (ignore_eos), against three setups: the server without LoRA,
the server with 4 adapters serving the base model only, and the same server with the 32 streams spread over its 4
adapters (every batch mixes them); the last two alternate, twice each, so that a noisy neighbour weighs on both.
The adapters are random PEFT LoRA adapters of the model (rank 16 on every linear layer, as
`target_modules="all-linear"` makes them), written once under bench/results/lora-adapters.

    python -m bench.lora
    python -m bench.lora --server-args "--torch-compile true" --rank 8

`--steps` times the eager packed decode step of 32 rows instead, in-process (the three setups interleaved step by
step, medians): a figure a busy machine disturbs less than a throughput run.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import os
import shlex
import statistics
import time
from pathlib import Path

import torch
import transformers
from peft import LoraConfig, get_peft_model

from batching import KVArena, Slots, kv_layout
from bench.decode_step import packed_step
from bench.load import make_client, run_level, served_model, stream_one
from bench.prompts import prompt_for
from bench.report import cpu_model
from bench.run_all import RESULTS, process_env
from config import Config, parse_config
from model_manager import load_model, lora_adapters, model_source
from tests.helpers.server_process import running_server

ADAPTERS = 4
STREAMS = 32


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="32 streams over 4 LoRA adapters against 32 on the base model.")
    parser.add_argument("--server-args", default="", help="flags for every server, e.g. '--torch-compile true'")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--requests", type=int, default=64, help="requests per run (32 in flight)")
    parser.add_argument("--steps", type=int, default=0, help="time this many decode steps per setup instead")
    return parser.parse_args(argv)


def write_adapters(model_folder: Path | str, rank: int) -> list[Path]:
    """Random adapters (init_lora_weights=False), their B scaled down so that answers stay text-like."""
    folders = []
    for index in range(ADAPTERS):
        folder = RESULTS / "lora-adapters" / f"rank{rank}-{index}"
        if not (folder / "adapter_config.json").is_file():
            torch.manual_seed(index)
            model = get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(model_folder),
                                   LoraConfig(r=rank, lora_alpha=rank, target_modules="all-linear",
                                              init_lora_weights=False))
            with torch.no_grad():
                for name, parameter in model.named_parameters():
                    if "lora_B" in name:
                        parameter.mul_(0.01)
            model.save_pretrained(folder)
        folders.append(folder)
    return folders


async def measure(base_url: str, label: str, models: list[str] | None, args: argparse.Namespace) -> float:
    """Tokens/s of 32 streams; `models`: the request's model field in turn (None: the base model)."""
    async with make_client(base_url, STREAMS) as client:
        base = await served_model(client)
        await stream_one(client, base, prompt_for(0), max_tokens=4)

        def extra_for(index: int) -> dict:
            return {"ignore_eos": True, **({"model": models[index % len(models)]} if models else {})}
        result = await run_level(client, base, STREAMS, args.requests, args.max_tokens, label, extra_for)
    print(f"{label}: {result.tokens_per_s:.1f} tokens/s ({result.failed} failed)", flush=True)
    return result.tokens_per_s


def run(flags: list[str], runs: list[tuple[str, list[str] | None]], args: argparse.Namespace, log: str
        ) -> list[tuple[str, float]]:
    log_path = RESULTS / f"server-lora-{log}.log"
    print(f"server: main.py {shlex.join(flags)} (log: {log_path})", flush=True)
    with running_server(*flags, env=process_env(os.environ.get("MKL_CBWR", "AUTO")), log_path=log_path) as url:
        return [(label, asyncio.run(measure(url, label, models, args))) for label, models in runs]


@torch.inference_mode()
def step_medians(config: Config, folders: list[Path], steps: int) -> dict[str, float]:
    """Milliseconds of the eager packed decode step of 32 rows at 128 of 256 positions: the model without LoRA
    layers, with them and no row using an adapter, and with the rows spread over the adapters."""
    plain, wrapped = load_model(config).model, load_model(config).model
    adapters = lora_adapters(wrapped, config, ("base",))
    for index, folder in enumerate(folders):
        adapters.load(f"adapter{index}", str(folder))
    arenas = [KVArena(kv_layout(plain), (STREAMS + 1) * 256, prefix_caching=False, slots=Slots(STREAMS, 256))
              for _ in range(2)]
    unadapted = packed_step(wrapped, arenas[1], STREAMS, 256, 128)

    def mixed() -> None:
        with adapters.layers.selected([row % ADAPTERS for row in range(STREAMS)], wrapped.device, wrapped.dtype):
            unadapted()
    setups = {"no LoRA": packed_step(plain, arenas[0], STREAMS, 256, 128), "LoRA layers, no adapter rows": unadapted,
              "LoRA layers, rows over 4 adapters": mixed}
    times: dict[str, list[float]] = {label: [] for label in setups}
    for step in setups.values():  # warm-up
        step()
    for _ in range(steps):
        for label, step in setups.items():
            started = time.perf_counter()
            step()
            times[label].append(time.perf_counter() - started)
    return {label: statistics.median(values) * 1e3 for label, values in times.items()}


def report_steps(args: argparse.Namespace, config: Config, medians: dict[str, float]) -> str:
    plain = medians["no LoRA"]
    lines = [f"# Multi-LoRA decode step, {datetime.datetime.now().isoformat(timespec='seconds')}", "",
             f"- {cpu_model()}, {os.cpu_count()} CPUs; {config.dtype}; flags: `{args.server_args}`; eager packed step "
             f"of {STREAMS} rows at 128 of 256 positions; {ADAPTERS} adapters of rank {args.rank} on every linear "
             f"layer; medians of {args.steps} steps each, interleaved", "",
             "| setup | step ms | vs no LoRA |", "|---|---|---|"]
    lines += [f"| {label} | {ms:.1f} | {ms / plain:.2f}x |" for label, ms in medians.items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    RESULTS.mkdir(parents=True, exist_ok=True)
    flags = shlex.split(args.server_args) + ["--continuous-batching-batch-size", str(STREAMS)]
    names = [f"adapter{index}" for index in range(ADAPTERS)]
    config = parse_config(flags)
    folders = write_adapters(model_source(config), args.rank)
    if args.steps:
        config = dataclasses.replace(config, max_loras=ADAPTERS, max_lora_rank=args.rank)
        text = report_steps(args, config, step_medians(config, folders, args.steps))
        (RESULTS / "lora-steps.md").write_text(text)
        print("\n" + text, flush=True)
        return
    lora_flags = [*flags, "--lora-modules", *(f"{n}={f}" for n, f in zip(names, folders)), "--max-loras",
                  str(ADAPTERS), "--max-lora-rank", str(args.rank)]
    plain, base, mixed = "no LoRA, base model", "4 adapters loaded, base model", "4 adapters loaded, mixed"
    rates = run(flags, [(plain, None)], args, "plain")
    rates += run(lora_flags, [(base, None), (mixed, names)] * 2, args, "lora")
    mean = {label: statistics.mean(rate for name, rate in rates if name == label) for label in (plain, base, mixed)}
    lines = [f"# Multi-LoRA, {datetime.datetime.now().isoformat(timespec='seconds')}", "",
             f"- {cpu_model()}, {os.cpu_count()} CPUs; flags: `{args.server_args}`; {STREAMS} streams, "
             f"{args.requests} requests of {args.max_tokens} tokens; {ADAPTERS} adapters of rank {args.rank} on every "
             "linear layer", "", "| run, in order | tokens/s | vs no LoRA |", "|---|---|---|"]
    lines += [f"| {label} | {rate:.1f} | {rate / mean[plain]:.2f}x |" for label, rate in rates]
    lines += ["", f"Mixing {ADAPTERS} adapters in every batch: {mean[mixed] / mean[plain]:.2f}x the base model's "
              f"throughput without LoRA, {mean[mixed] / mean[base]:.2f}x the base model's with the adapters loaded "
              "(means of the runs)."]
    text = "\n".join(lines) + "\n"
    (RESULTS / "lora.md").write_text(text)
    print("\n" + text, flush=True)


if __name__ == "__main__":
    main()
