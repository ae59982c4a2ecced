"""How close a decode step comes to the machine's matmul speed: for each batch size, the time of the eager
engine's packed forward and of the static-shape step (eager, and compiled with --compile) against the time
of the model's linear layers alone as `F.linear` calls on the same shapes (the matmul floor, with the GFLOPS
it reaches). With --hqq in the server flags the steps run on the quantised model and the floor stays the
float weights' (at one row, int4 kernels read a quarter of the bytes and can beat it); so does the floor of
bfloat16 layers that the server packs for oneDNN, which the steps can beat too.

    python -m bench.decode_step                          # rows 1, 8, 32; slots of 512 tokens, half full
    python -m bench.decode_step --compile --rows 32
    python -m bench.decode_step --compile --rows 1 --server-args "--hqq true"
"""

from __future__ import annotations

import os

os.environ.setdefault("MKL_CBWR", "AUTO")  # as main.py leaves it without --batch-invariant; before torch

import argparse  # noqa: E402
import shlex  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from functools import partial  # noqa: E402
from typing import Callable  # noqa: E402

import torch  # noqa: E402

from batching import KVArena, Slots, kv_layout  # noqa: E402
from batching.attention import PackedSpan, SpanStep  # noqa: E402
from batching.static_decode import DecodeForward, compiled_per_bucket  # noqa: E402
from bench.load import parse_levels  # noqa: E402
from bench.run_all import cpu_model  # noqa: E402
from config import parse_config  # noqa: E402
from converters.linear_layers import stands_for_linear  # noqa: E402
from model_manager import load_model  # noqa: E402


def median_seconds(call: Callable[[], object], repeats: int) -> float:
    call()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def packed_step(model: torch.nn.Module, arena: KVArena, rows: int, length: int, position: int) -> Callable:
    """The eager engine's decode: the rows' tokens packed into one [1, rows] forward, each attending to its own
    extent (here the rows' slots) over exactly its length."""
    device = model.device
    ids = torch.zeros(1, rows, dtype=torch.long, device=device)
    positions = torch.full((1, rows), position, dtype=torch.long, device=device)
    slots = torch.arange(rows, device=device) * length + position
    spans = [PackedSpan(row, row + 1, row * length, position + 1) for row in range(rows)]
    every_row = torch.arange(rows, device=device)
    return lambda: model(input_ids=ids, position_ids=positions, logits_to_keep=every_row, use_cache=False,
                         batchwise_step=SpanStep(arena, slots, spans))


def linear_weights(model: torch.nn.Module) -> list[torch.Tensor]:
    """A float weight of each linear layer's shape (random where the layer keeps its own packed or quantised)."""
    return [module.weight if isinstance(module, torch.nn.Linear) else
            torch.randn(module.out_features, module.in_features, dtype=model.dtype, device=model.device)
            for module in model.modules() if isinstance(module, torch.nn.Linear) or stands_for_linear(module)]


@torch.inference_mode()
def matmul_floor(weights: list[torch.Tensor], rows: int, repeats: int) -> tuple[float, float]:
    """(seconds, multiply-adds) of every linear layer's product for `rows` tokens as plain `F.linear` calls, back
    to back."""
    inputs = [torch.randn(rows, w.shape[1], dtype=w.dtype, device=w.device) for w in weights]
    seconds = median_seconds(lambda: [torch.nn.functional.linear(x, w) for x, w in zip(inputs, weights)], repeats)
    return seconds, sum(rows * w.numel() for w in weights)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="The static decode step against the matmul floor.")
    parser.add_argument("--server-args", default="", help="main.py flags naming the model, dtype, device, --hqq")
    parser.add_argument("--rows", type=parse_levels, default=[1, 8, 32])
    parser.add_argument("--length", type=int, default=512, help="tokens per slot; rows attend to half of it")
    parser.add_argument("--compile", action="store_true", help="also time the step compiled (a minute per size)")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)
    config = parse_config(shlex.split(args.server_args))
    model = load_model(config).model
    weights = linear_weights(model)
    slots = Slots(max(args.rows), args.length)
    arena = KVArena(kv_layout(model), slots.tokens, prefix_caching=False, slots=slots)
    forward = DecodeForward(model, arena)
    compiled = compiled_per_bucket(forward, config.torch_compile_mode, args.rows, "decode step") if args.compile \
        else None
    quantised = " with HQQ" if config.hqq else ""
    print(f"{cpu_model()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} threads, MKL_CBWR="
          f"{os.environ['MKL_CBWR']}; {config.hf_model} as {config.dtype}{quantised}; slots of {args.length} tokens\n")
    print("| rows | matmul floor ms (GFLOPS) | packed eager step ms (fraction of floor) | static eager step ms "
          "(fraction) | static compiled step ms (fraction) |")
    print("|---|---|---|---|---|")
    for rows in args.rows:
        position = torch.full((rows,), args.length // 2, dtype=torch.long, device=model.device)
        starts = torch.arange(rows, device=model.device) * args.length
        arguments = (torch.zeros(rows, dtype=torch.long, device=model.device), position, position + 1,
                     starts + position, starts)
        floor, multiply_adds = matmul_floor(weights, rows, args.repeats)
        cells = [str(rows), f"{floor * 1e3:.1f} ({2 * multiply_adds / floor / 1e9:.1f})"]
        packed = packed_step(model, arena, rows, args.length, args.length // 2)
        static = [None if step is None else partial(step, *arguments) for step in (forward, compiled)]
        for step in (packed, *static):
            if step is None:
                cells.append("not run")
                continue
            with torch.inference_mode():
                seconds = median_seconds(step, args.repeats)
            cells.append(f"{seconds * 1e3:.1f} ({floor / seconds:.2f})")
        print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
