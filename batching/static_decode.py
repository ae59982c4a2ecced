"""The decode step of a static cache, gpt-fast style: the decoding rows padded to a bucket of fixed size
(1, 2, 4, 8, ... up to the batch size), one token each, attending over their fixed-length slots. Its shapes
depend only on the bucket, so with --torch-compile it is compiled once per bucket at start-up (CUDA graphs
on CUDA with mode reduce-overhead) and never while serving.

Where attend_rows serves the attention (CPU), prompt chunks join the step too, one token per row: a step of
decoding rows beside prompt chunks then runs compiled instead of eagerly, in one more bucket sized for the
most such a step holds (the batch plus the prompt tokens a step may add beside it). There long rows (whose K/V
lie outside the slots: batching.kv_arena) join the step as well; elsewhere a row attends over its slot, so steps
holding a long row run packed."""

from __future__ import annotations

import itertools
import logging
import time
from functools import partial
from pathlib import Path
from types import FunctionType
from typing import Any, Callable

import torch
from transformers import PreTrainedModel

from batching.attention import StaticDecodeStep
from batching.kv_arena import KVArena, KVLayout
from batching.layer_regions import trace_layers_once
from batching.lora import NO_ADAPTER, AdapterRows
from batching.saved_steps import SavedSteps, saved_or_compiled
from batching.scheduler import Span
from batching.vision import ImageInputs, text_position
from kernels import decode_attention

logger = logging.getLogger("batchwise.compile")


def rows_attend_anywhere(layout: KVLayout) -> bool:
    """Whether the static step's attention (attend_rows) gives each row its own keys wherever they lie in the
    arena, rather than its row's slot."""
    return all(decode_attention.serves(device, layout.dtype, layout.head_dim) for device in layout.devices)


def bucket_sizes(rows: int, smallest: int = 1) -> list[int]:
    """1, 2, 4, 8, ... (from `smallest`) up to and including `rows`."""
    sizes, size = [], smallest
    while size < rows:
        sizes.append(size)
        size *= 2
    return [*sizes, rows]


def compiled_per_bucket(forward: torch.nn.Module, mode: str, buckets: list[int], what: str,
                        saved_in: Path | None = None, compile_missing: bool = True) -> Callable[..., torch.Tensor]:
    """torch.compile with static shapes: one graph per bucket, all kept. Inductor's fused kernels would keep
    half-precision intermediates (norms, rotary, residual sums) in float32 where the eager model rounds each one:
    a compiled bfloat16 step then drifts about an ulp a layer from the eager step and from transformers, and flips
    the model's near-ties (the embedded model's first answer token: "L'Étoile..." for "The capital...", 0.08 nats
    apart in float32). emulate_precision_casts rounds where eager rounds: that prompt's compiled K/V equal the eager
    step's in all 30 layers. Not every step to the bit (oneDNN's products, the head): over 56 answers the compiled and
    eager static steps agreed on 41, as bfloat16 paths do (eager and static: 34).

    Dynamo checks no guard on the modules (weights, buffers, their attributes) at each call, only those on the
    inputs, which tell the buckets apart: SmolLM2-135M's one-row step had some 8,000 guards, 1.5 ms of a 10 ms
    step, 0.14 ms after. Sound because the graphs belong to this `forward` alone: dynamo keeps compiled graphs per
    code object, and the forward is compiled through a code object of its own, so another model compiled in the
    same process (tests do) never meets these graphs.

    saved_in: a folder where each bucket's graph is saved and later starts load it (batching.saved_steps);
    compile_missing false: nothing is compiled here, a bucket whose step is not saved runs eagerly until another
    process saves it (--torch-compile auto)."""
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 2 * len(buckets))
    sizes = ", ".join(map(str, buckets))
    if compile_missing:
        logger.info("compiling the %s (torch.compile mode %s) for batch sizes %s", what, mode, sizes)
    else:
        logger.info("the %s runs compiled for the batch sizes whose steps are saved, eagerly until then (batch "
                    "sizes %s)", what, sizes)
    options = {**torch._inductor.list_mode_options(mode), "emulate_precision_casts": True,
               "guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe}
    compiled = partial(torch.compile(with_own_code(type(forward).forward), dynamic=False, options=options),
                       forward) if compile_missing else forward
    return compiled if saved_in is None else saved_or_compiled(forward, options, saved_in, compiled, compile_missing)


def with_own_code(function: FunctionType) -> FunctionType:
    """A copy of `function` whose code object is its own (equal to the original, not the same object)."""
    return FunctionType(function.__code__.replace(), function.__globals__, function.__name__,
                        function.__defaults__, function.__closure__)


@torch.inference_mode()
def warm_up_buckets(buckets: list[int], run: Callable[[int], None], on_ready: Callable[[int, int], None], what: str,
                    unit: str, runs: int) -> None:
    """Run every bucket `runs` times (twice on CUDA: CUDA graphs record on a later call than the one that compiles),
    so the first requests never wait for a compilation; on_ready(buckets ready, all buckets) after each."""
    on_ready(0, len(buckets))
    for ready, size in enumerate(buckets, 1):
        started = time.perf_counter()
        for _ in range(runs):
            run(size)
        logger.info("%s for %d %s%s ready in %.1f s", what, size, unit, "" if size == 1 else "s",
                    time.perf_counter() - started)
        on_ready(ready, len(buckets))


class DecodeForward(torch.nn.Module):
    """What is compiled: the model's forward for one token per row, with the arena's K/V as buffers, so that a
    compiled graph updates them in place (and CUDA graphs see fixed addresses)."""

    def __init__(self, model: PreTrainedModel, arena: KVArena, lora_rows: AdapterRows | None = None) -> None:
        super().__init__()
        self.model = model
        self.lora_rows = lora_rows
        self.slot_length = arena.slots.length
        for layer, (keys, values) in enumerate(zip(arena.keys, arena.values)):
            self.register_buffer(f"keys_{layer}", keys, persistent=False)
            self.register_buffer(f"values_{layer}", values, persistent=False)
        self.layers = len(arena.keys)
        trace_layers_once(model)

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, lengths: torch.Tensor,
                arena_positions: torch.Tensor, starts: torch.Tensor, adapters: torch.Tensor | None = None
                ) -> torch.Tensor:
        """ids, positions, lengths, arena_positions, starts, adapters: [rows] (lengths, arena_positions and starts as
        StaticDecodeStep's, adapters each row's LoRA slot); returns next-token logits [rows, vocab]. With LoRA layers
        every row's update is computed, whatever the rows' adapters: the graph is the same for any mix."""
        step = StaticDecodeStep([getattr(self, f"keys_{i}") for i in range(self.layers)],
                                [getattr(self, f"values_{i}") for i in range(self.layers)],
                                self.slot_length, lengths, arena_positions, starts)
        if self.lora_rows is not None:
            self.lora_rows.select(adapters, self.model.dtype)
        try:
            output = self.model(input_ids=ids[:, None], position_ids=positions[:, None], logits_to_keep=1,
                                use_cache=False, batchwise_step=step)
        finally:
            if self.lora_rows is not None:
                self.lora_rows.clear()
        return output.logits[:, -1]


class BucketedDecoder:
    """A decode step of static shapes: its rows padded up to the smallest bucket that holds them, so that with a
    compile mode it is compiled once per bucket, at warm-up, and never while serving. A subclass gives the forward
    (whose inputs are long tensors, one per list of _padding's) and _padding."""

    def __init__(self, forward: torch.nn.Module, buckets: list[int], device: torch.device, compile_mode: str | None,
                 names: tuple[str, str], saved_in: Path | None = None, compile_missing: bool = True) -> None:
        """names: the step's and a bucket unit's (what a bucket counts), for the log; saved_in, compile_missing:
        compiled_per_bucket's."""
        self.buckets = buckets
        self.device = device
        self.names = names
        self.step = forward if compile_mode is None else compiled_per_bucket(forward, compile_mode, buckets, names[0],
                                                                             saved_in, compile_missing)

    def bucket(self, size: int) -> int:
        return next(bucket for bucket in self.buckets if bucket >= size)

    def warm_up(self, on_ready: Callable[[int, int], None]) -> None:
        """Each bucket compiled, or its saved step loaded, before serving; not those that run eagerly until another
        process saves their step (--torch-compile auto): they have nothing to prepare."""
        compiled_elsewhere = isinstance(self.step, SavedSteps) and not self.step.compile_missing
        waiting = set(self.unsaved_buckets()) if compiled_elsewhere else set()
        warm_up_buckets([bucket for bucket in self.buckets if bucket not in waiting], self._run_padding, on_ready,
                        *self.names, runs=2 if self.device.type == "cuda" else 1)

    @property
    def saved_in(self) -> Path | None:
        """The folder where this step's compiled steps are saved (its key's); None where they are not saved."""
        return self.step.folder if isinstance(self.step, SavedSteps) else None

    def unsaved_buckets(self) -> list[int]:
        """The buckets whose compiled step could be saved but is not yet: what a background compile would save."""
        return [bucket for bucket in self.buckets if not self.step.saved(bucket)] if self.saved_in else []

    def _padding(self, size: int) -> list[list[int]]:
        """The step's inputs for a bucket of `size` before the step's rows are written over them: every row
        padding, its K/V written where nothing reads them."""
        raise NotImplementedError

    def _run_padding(self, size: int) -> None:
        self._run(self._padding(size))

    def _run(self, inputs: list[list[int]]) -> Any:
        # a tensor of its own for each input, warming up as serving: one passed twice would be a graph for aliased
        # inputs (and a recompilation while serving)
        return self.step(*map(self._tensor, inputs))

    def _tensor(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)


class StaticDecoder(BucketedDecoder):
    def __init__(self, model: PreTrainedModel, arena: KVArena, compile_mode: str | None = None,
                 min_rows: int = 1, prompt_tokens: int = 0, lora_rows: AdapterRows | None = None,
                 saved_in: Path | None = None, compile_missing: bool = True) -> None:
        """prompt_tokens: how many prompt tokens a step may hold beside a full batch of decoding rows (0: steps
        with prompts never run here); saved_in, compile_missing: compiled_per_bucket's."""
        self.slots = arena.slots
        self.padding = arena.scratch.start  # where rows of a bucket that hold no token write their K/V
        self.takes_prompts = prompt_tokens > 0
        self.takes_long_rows = rows_attend_anywhere(arena.layout)
        self.has_slot = arena.has_slot
        buckets = bucket_sizes(self.slots.rows, min(min_rows, self.slots.rows))
        if prompt_tokens:
            buckets.append(self.slots.rows + prompt_tokens)
        super().__init__(DecodeForward(model, arena, lora_rows), buckets, model.device, compile_mode,
                         ("decode step", "row"), saved_in, compile_missing)

    def takes(self, spans: list[Span]) -> bool:
        """Whether the step's spans run here: decoding rows, and where prompts may join them, prompt chunks of text
        (without prompt logprobs, which need every position's logits, nor embeddings, which need hidden states) and
        drafts to verify, if all their tokens fit the largest bucket; long rows only where rows attend anywhere."""
        if not self.takes_long_rows and not all(self.has_slot(span.seq) for span in spans):
            return False
        if all(span.seq.decoding and not span.draft for span in spans):
            return True
        return (self.takes_prompts and sum(span.stop - span.start for span in spans) <= self.buckets[-1]
                and not any(isinstance(span.seq.inputs, ImageInputs) or span.seq.params.prompt_logprobs
                            or span.seq.params.pooled for span in spans))

    def logits(self, spans: list[Span]) -> torch.Tensor:
        """Next-token logits ([spans that sample, vocab], in span order) of spans it takes."""
        logits, places = self._forward(spans)
        sampled = [places[last] for span, last in zip(spans, _last_tokens(spans)) if span.samples]
        if sampled == list(range(len(sampled))):  # in order from the first row: no copy of the logits needed
            return logits[:len(sampled)]
        return logits[self._tensor(sampled)]

    def draft_logits(self, spans: list[Span]) -> list[torch.Tensor]:
        """For each span that samples, in order, the logits at its last token and at each of its draft tokens
        ([1 + draft, vocab], as the packed forward gives them to verify drafts), of spans it takes."""
        logits, places = self._forward(spans)
        return [logits[places[last - len(span.draft)]:places[last] + 1]
                for span, last in zip(spans, _last_tokens(spans)) if span.samples]

    @torch.inference_mode()
    def _forward(self, spans: list[Span]) -> tuple[torch.Tensor, list[int]]:
        """The step's logits, one row per token, and the row of each of the spans' tokens (with their drafts', in
        span order). Decoding rows alone lie in their sequences' rows; with prompt chunks or drafts, every token
        lies in a row of its own, in span order. Rows without a token write to the padding slot and their logits
        are dropped."""
        tokens = [(span, position) for span in spans for position in range(span.start, span.stop)]
        places = [span.seq.row for span in spans] if len(tokens) == len(spans) else list(range(len(tokens)))
        inputs = self._padding(self.bucket(max(places) + 1))
        ids, positions, lengths, arena_positions, starts, adapters = inputs
        for place, (span, position) in zip(places, tokens):
            seq = span.seq
            ids[place] = seq.all_ids[position] if position < span.end else span.draft[position - span.end]
            positions[place], adapters[place] = text_position(seq, position), seq.adapter_slot
            lengths[place], arena_positions[place], starts[place] = position + 1, seq.kv.start + position, seq.kv.start
        return self._run(inputs), places

    def _padding(self, rows: int) -> list[list[int]]:
        """ids, positions, lengths, arena positions, starts, adapters: each row one token, written to the padding
        slot, without an adapter."""
        return [[0] * rows, [0] * rows, [1] * rows, [self.padding] * rows, [self.padding] * rows,
                [NO_ADAPTER] * rows]


def _last_tokens(spans: list[Span]) -> list[int]:
    """The index of each span's last token (its draft's last, with a draft) among the step's tokens."""
    return [end - 1 for end in itertools.accumulate(span.stop - span.start for span in spans)]
