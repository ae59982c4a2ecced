"""In-process baselines with plain transformers: sequential `model.generate` at batch 1 and one
static batch, both greedy with exactly `max_new_tokens` new tokens per row.

Run it in its own process, never next to the server: both are CPU-bound.
    python -m bench.baseline --server-args "--torch-dtype float32" --output bench/results/baseline.json
"""

from __future__ import annotations

import os

# the same MKL mode as the server (run_all passes it on); must precede torch
os.environ.setdefault("MKL_CBWR", "AUTO")

import argparse  # noqa: E402
import json  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers.generation.streamers import BaseStreamer  # noqa: E402

import model_manager  # noqa: E402
from bench.prompts import chat_messages, prompt_for  # noqa: E402
from bench.stats import Measurement  # noqa: E402
from config import Config, parse_config  # noqa: E402

Model = transformers.PreTrainedModel
Tokenizer = transformers.PreTrainedTokenizerBase


class FirstTokenClock(BaseStreamer):
    """generate() calls put() once with the prompt, then once per step; the second call is the first token."""

    def __init__(self) -> None:
        self.calls = 0
        self.first_token_at: float | None = None

    def put(self, value: torch.Tensor) -> None:
        self.calls += 1
        if self.calls == 2:
            self.first_token_at = time.perf_counter()

    def end(self) -> None:
        pass


def load(config: Config) -> tuple[Model, Tokenizer]:
    source = model_manager.model_source(config)
    tokenizer = transformers.AutoTokenizer.from_pretrained(source)
    model = transformers.AutoModelForCausalLM.from_pretrained(source, dtype=config.dtype, attn_implementation="sdpa")
    model.to(config.device).eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def chat_text(tokenizer: Tokenizer, prompt: str) -> str:
    """The prompt exactly as the server builds it for /v1/chat/completions."""
    return tokenizer.apply_chat_template(chat_messages(prompt), add_generation_prompt=True, tokenize=False)


def timed_generate(model: Model, inputs: dict[str, torch.Tensor],
                   max_new_tokens: int) -> tuple[float, float, int]:
    """Returns (seconds to first token, seconds in total, new tokens per row)."""
    clock = FirstTokenClock()
    started = time.perf_counter()
    with torch.inference_mode():
        output = model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens,
                                min_new_tokens=max_new_tokens, streamer=clock)
    latency = time.perf_counter() - started
    ttft = (clock.first_token_at or time.perf_counter()) - started
    return ttft, latency, output.shape[1] - inputs["input_ids"].shape[1]


def encode(tokenizer: Tokenizer, prompts: list[str], device: str) -> dict:
    texts = [chat_text(tokenizer, p) for p in prompts]
    return tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)


def sequential(model: Model, tokenizer: Tokenizer, config: Config, count: int, max_new_tokens: int,
               label: str) -> Measurement:
    ttfts, latencies, tokens = [], [], 0
    for index in range(count):
        ttft, latency, new_tokens = timed_generate(model, encode(tokenizer, [prompt_for(index)], config.device),
                                                   max_new_tokens)
        ttfts.append(ttft)
        latencies.append(latency)
        tokens += new_tokens
        log(f"{label}: prompt {index + 1}/{count}: {new_tokens} tokens in {latency:.2f} s")
    return Measurement(label, count, tokens, sum(latencies), ttfts, latencies,
                       requested_tokens_each=max_new_tokens)


def static_batch(model: Model, tokenizer: Tokenizer, config: Config, batch: int, max_new_tokens: int,
                 label: str) -> Measurement:
    inputs = encode(tokenizer, [prompt_for(i) for i in range(batch)], config.device)
    ttft, latency, new_tokens = timed_generate(model, inputs, max_new_tokens)
    log(f"{label}: {batch} x {new_tokens} tokens in {latency:.2f} s")
    # every row starts and ends together, so each request sees the batch's TTFT and latency
    return Measurement(label, batch, batch * new_tokens, latency, [ttft] * batch, [latency] * batch,
                       requested_tokens_each=max_new_tokens)


def warm_up(model: Model, tokenizer: Tokenizer, config: Config, batch: int) -> None:
    for size in (1, batch):
        timed_generate(model, encode(tokenizer, [prompt_for(i) for i in range(size)], config.device), 2)


def log(message: str) -> None:
    print(f"baseline: {message}", file=sys.stderr, flush=True)


def dtype_name(config: Config) -> str:
    return str(config.dtype).removeprefix("torch.")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Sequential and static-batch model.generate baselines.")
    parser.add_argument("--server-args", default="", help="the server's flags, so model, dtype and device match")
    parser.add_argument("--sequential-prompts", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--output", help="write the measurements here as JSON")
    parser.add_argument("--when", help="said in the labels, e.g. 'before the servers'")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    transformers.utils.logging.disable_progress_bar()
    config = parse_config(shlex.split(args.server_args))
    log(f"MKL_CBWR={os.environ['MKL_CBWR']}, {config.hf_model} on {config.device} as {dtype_name(config)}, "
        f"{torch.get_num_threads()} torch threads")
    model, tokenizer = load(config)
    warm_up(model, tokenizer, config, args.batch_size)
    suffix = f"{dtype_name(config)}, sdpa" + (f", {args.when}" if args.when else "")
    measurements = [
        sequential(model, tokenizer, config, args.sequential_prompts, args.max_new_tokens,
                   f"sequential `generate` (batch 1, {suffix})"),
        static_batch(model, tokenizer, config, args.batch_size, args.max_new_tokens,
                     f"static-batch `generate`@{args.batch_size} ({suffix})"),
    ]
    result = {"mkl_cbwr": os.environ["MKL_CBWR"], "measurements": [m.to_json() for m in measurements]}
    if args.output:
        with open(args.output, "w") as file:
            json.dump(result, file, indent=1)
    else:
        print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
