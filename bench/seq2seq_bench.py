"""Encoder-decoder throughput (issue 11): Batchwise serving a Flan-T5-small-shaped model (random weights built
from its config over the embedded tokenizer's vocabulary: speed only) at 1, 8 and 32 concurrent streams,
against sequential `model.generate` on the same model, encoder inputs and dtype (the one --torch-dtype auto
picks on this machine), in one run.

    python -m bench.seq2seq_bench                  # writes bench/results/seq2seq.md
    python -m bench.seq2seq_bench --server-args "" --server-args "--torch-compile true"

Each --server-args is one server configuration, measured one after another in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import shlex
import tempfile
import time
from pathlib import Path

import torch
import transformers

from bench.kv_bench import cpu_model, tokenizer
from bench.load import make_client, run_level
from bench.prompts import chat_messages, prompt_for
from bench.report import markdown_table
from bench.run_all import DEFAULT_MKL_CBWR, RESULTS, process_env
from bench.stats import Measurement
from config import Config
from serving.template import plain_dialogue
from tests.helpers.server_process import running_server

MODEL = "flan-t5-small-random"
FLAN_T5_SMALL = dict(d_model=512, d_kv=64, d_ff=1024, num_layers=8, num_decoder_layers=8, num_heads=6,
                     feed_forward_proj="gated-gelu", tie_word_embeddings=False)


def build_model(folder: Path) -> transformers.PreTrainedModel:
    text = tokenizer()
    text.chat_template = None  # chats reach the encoder as the plain dialogue fallback renders them
    torch.manual_seed(0)
    config = transformers.T5Config(vocab_size=len(text), pad_token_id=0, eos_token_id=text.eos_token_id,
                                   decoder_start_token_id=0, **FLAN_T5_SMALL)
    model = transformers.T5ForConditionalGeneration(config).eval()
    model.save_pretrained(folder)
    text.save_pretrained(folder)
    return model


def sequential_generate(model: transformers.PreTrainedModel, count: int, max_tokens: int) -> Measurement:
    """One request after another, as `generate` serves them: the same encoder inputs as the server's."""
    text = tokenizer()
    inputs = [text(plain_dialogue(chat_messages(prompt_for(index))), return_tensors="pt").input_ids
              for index in range(count)]
    with torch.inference_mode():
        model.generate(inputs[0], max_new_tokens=4)  # warm-up
        started, tokens = time.perf_counter(), 0
        for ids in inputs:
            output = model.generate(ids, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False)
            tokens += output.shape[1] - 1
    return Measurement("sequential generate", count, tokens, time.perf_counter() - started,
                       requested_tokens_each=max_tokens)


async def serve_levels(url: str, levels: list[int], max_tokens: int, per_level: int, name: str
                       ) -> list[Measurement]:
    async with make_client(url, max(levels)) as client:
        measurements = []
        for concurrency in levels:
            label = f"Batchwise{name}, {concurrency} streams"
            measurement = await run_level(client, MODEL, concurrency, per_level * concurrency, max_tokens, label,
                                          extra_for=lambda index: {"ignore_eos": True})
            print(f"{label}: {measurement.tokens_per_s:.1f} tokens/s", flush=True)
            measurements.append(measurement)
        return measurements


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Encoder-decoder throughput against sequential generate.")
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--requests-per-level", type=int, default=2)
    parser.add_argument("--sequential-requests", type=int, default=4)
    parser.add_argument("--server-args", action="append",
                        help="flags of one server configuration (repeat for more; default: none)")
    args = parser.parse_args(argv)
    RESULTS.mkdir(parents=True, exist_ok=True)
    dtype = Config().dtype  # what --torch-dtype auto picks here, for the servers and the baseline alike
    servers = []
    with tempfile.TemporaryDirectory() as folder:
        model = build_model(Path(folder)).to(dtype)
        env = process_env(os.environ.get("MKL_CBWR", DEFAULT_MKL_CBWR))
        for flags in args.server_args or [""]:
            with running_server("--hf-model", folder, "--architecture-type", "encoder-decoder", "--served-model-name",
                                MODEL, "--continuous-batching-batch-size", str(max(args.levels)),
                                "--static-cache-decoder-max-length", str(args.max_tokens + 1), *shlex.split(flags),
                                env=env, log_path=RESULTS / "seq2seq-server.log") as url:
                name = f" `{flags}`" if flags else ""
                servers += asyncio.run(serve_levels(url, args.levels, args.max_tokens, args.requests_per_level, name))
        baseline = sequential_generate(model, args.sequential_requests, args.max_tokens)
        print(f"sequential generate: {baseline.tokens_per_s:.1f} tokens/s", flush=True)
    lines = [f"# Encoder-decoder benchmark, {datetime.datetime.now().isoformat(timespec='seconds')}", "",
             f"CPU: {cpu_model()}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
             f"{str(dtype).removeprefix('torch.')} ({Config().dtype_choice()[1]}); "
             f"{MODEL} ({sum(p.numel() for p in model.parameters()) / 1e6:.0f} M parameters), "
             f"{args.max_tokens} tokens per request (ignore_eos), streaming chat", "",
             markdown_table(servers, baseline, None, [baseline])]
    (RESULTS / "seq2seq.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
