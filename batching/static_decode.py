"""The decode step of a static cache, gpt-fast style: the decoding rows padded to a bucket of fixed size
(1, 2, 4, 8, ... up to the batch size), one token each, attending over their fixed-length slots. Its shapes
depend only on the bucket, so with --torch-compile it is compiled once per bucket at start-up (CUDA graphs
on CUDA with mode reduce-overhead) and never while serving."""

from __future__ import annotations

import logging
import time
from typing import Callable

import torch
from transformers import PreTrainedModel

from batching.attention import StaticDecodeStep
from batching.kv_arena import KVArena
from batching.scheduler import Span
from batching.vision import text_position

logger = logging.getLogger("batchwise.compile")


def bucket_sizes(rows: int, smallest: int = 1) -> list[int]:
    """1, 2, 4, 8, ... (from `smallest`) up to and including `rows`."""
    sizes, size = [], smallest
    while size < rows:
        sizes.append(size)
        size *= 2
    return [*sizes, rows]


def compiled_per_bucket(forward: torch.nn.Module, mode: str, buckets: list[int], what: str) -> torch.nn.Module:
    """torch.compile with static shapes: one graph per bucket, all kept."""
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 2 * len(buckets))
    logger.info("compiling the %s (torch.compile mode %s) for batch sizes %s", what, mode, ", ".join(map(str, buckets)))
    return torch.compile(forward, mode=mode, dynamic=False)


@torch.inference_mode()
def warm_up_buckets(buckets: list[int], run: Callable[[int], None], on_ready: Callable[[int, int], None], what: str,
                    unit: str) -> None:
    """Run every bucket (twice: CUDA graphs record on a later call than the one that compiles), so the first
    requests never wait for a compilation; on_ready(buckets ready, all buckets) after each."""
    on_ready(0, len(buckets))
    for ready, size in enumerate(buckets, 1):
        started = time.perf_counter()
        for _ in range(2):
            run(size)
        logger.info("%s for %d %s%s ready in %.1f s", what, size, unit, "" if size == 1 else "s",
                    time.perf_counter() - started)
        on_ready(ready, len(buckets))


def trust_warm_graphs() -> None:
    """For a server, once every compiled step is warm: dynamo checks, at each call, only the guards that tell one
    compiled graph from another (the batch size), not those on every weight (SmolLM2-135M's 32-row step: 1.1 ms
    of guards, 0.2 after). Sound while nothing recompiles after warm-up (tested) and the process holds one model:
    tests that compile many models in one process never call it."""
    torch.compiler.set_stance("default", skip_guard_eval_unsafe=True)


class DecodeForward(torch.nn.Module):
    """What is compiled: the model's forward for [rows, 1] tokens, with the arena's K/V as buffers, so that a
    compiled graph updates them in place (and CUDA graphs see fixed addresses)."""

    def __init__(self, model: PreTrainedModel, arena: KVArena) -> None:
        super().__init__()
        self.model = model
        self.slot_length = arena.slots.length
        for layer, (keys, values) in enumerate(zip(arena.keys, arena.values)):
            self.register_buffer(f"keys_{layer}", keys, persistent=False)
            self.register_buffer(f"values_{layer}", values, persistent=False)
        self.layers = len(arena.keys)

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, lengths: torch.Tensor,
                arena_positions: torch.Tensor) -> torch.Tensor:
        """ids/positions: [rows, 1]; lengths, arena_positions: [rows]; returns next-token logits [rows, vocab]."""
        step = StaticDecodeStep([getattr(self, f"keys_{i}") for i in range(self.layers)],
                                [getattr(self, f"values_{i}") for i in range(self.layers)],
                                self.slot_length, lengths, arena_positions)
        output = self.model(input_ids=ids, position_ids=positions, logits_to_keep=1, use_cache=False,
                            batchwise_step=step)
        return output.logits[:, -1]


class StaticDecoder:
    def __init__(self, model: PreTrainedModel, arena: KVArena, compile_mode: str | None = None,
                 min_rows: int = 1) -> None:
        self.slots = arena.slots
        self.padding = arena.scratch.start  # where rows of a bucket that hold no sequence write their K/V
        self.device = model.device
        self.buckets = bucket_sizes(self.slots.rows, min(min_rows, self.slots.rows))
        forward = DecodeForward(model, arena)
        self.step = forward if compile_mode is None else compiled_per_bucket(forward, compile_mode, self.buckets,
                                                                             "decode step")

    @torch.inference_mode()
    def decode(self, spans: list[Span]) -> torch.Tensor:
        """Next-token logits ([len(spans), vocab]) for decoding rows; rows without a span in the bucket write to
        the padding slot and their logits are dropped."""
        rows = self.bucket(max(span.seq.row for span in spans) + 1)
        ids, positions, lengths, arena_positions = [0] * rows, [0] * rows, [1] * rows, [self.padding] * rows
        for span in spans:
            row, position = span.seq.row, span.start
            ids[row], positions[row] = span.seq.all_ids[position], text_position(span.seq, position)
            lengths[row] = position + 1
            arena_positions[row] = row * self.slots.length + position
        logits = self.step(self._tensor(ids)[:, None], self._tensor(positions)[:, None], self._tensor(lengths),
                           self._tensor(arena_positions))
        span_rows = [span.seq.row for span in spans]
        if span_rows == list(range(len(spans))):  # every row busy, in order: no copy of the logits needed
            return logits[:len(spans)]
        return logits[self._tensor(span_rows)]

    def bucket(self, rows: int) -> int:
        return next(size for size in self.buckets if size >= rows)

    def warm_up(self, on_ready: Callable[[int, int], None]) -> None:
        warm_up_buckets(self.buckets, self._run_padding, on_ready, "decode step", "row")

    def _run_padding(self, rows: int) -> None:
        zeros = self._tensor([0] * rows)
        self.step(zeros[:, None], zeros[:, None], zeros + 1, zeros + self.padding)

    def _tensor(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)
