"""The continuous-batching loop: admit every tick, run one step off the event loop, route tokens back."""

from __future__ import annotations

import asyncio
import logging
import secrets
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any, AsyncIterator, Callable, TypeVar

import torch

from batching.detokenizer import Decoder, IncrementalDetokenizer
from batching.profiler import StepProfiler
from batching.runner import ModelRunner
from batching.scheduler import Scheduler, Span
from batching.sequence import Delta, SamplingParams, Sequence, TokenLogprob

logger = logging.getLogger("batchwise.engine")

T = TypeVar("T")


class EngineError(RuntimeError):
    pass


@dataclass
class EngineStats:
    running: int
    waiting: int
    steps: int
    alive: bool


class Engine:
    def __init__(self, runner: ModelRunner, scheduler: Scheduler, tokenizer: Decoder,
                 eos_token_ids: frozenset[int], microsleep: float, profiler: StepProfiler | None = None) -> None:
        self.runner = runner
        self.profiler = profiler
        self.scheduler = scheduler
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.microsleep = microsleep
        self.steps = 0
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="batchwise-step")
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="batchwise-engine")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._executor.shutdown(wait=True)
        if self.profiler:
            self.profiler.report()

    @property
    def alive(self) -> bool:
        return self._task is not None and not self._task.done()

    @property
    def max_sequence_tokens(self) -> int:
        """The most tokens (prompt plus completion) one sequence can hold in this engine's KV memory."""
        return self.scheduler.memory.sequence_capacity

    def stats(self) -> EngineStats:
        return EngineStats(len(self.scheduler.running), len(self.scheduler.waiting), self.steps, self.alive)

    def add(self, prompt_ids: list[int], params: SamplingParams, request_id: str = "", inputs: Any = None) -> Sequence:
        """Queue a sequence; raises QueueFullError when running plus waiting is at the limit."""
        return self.add_siblings(prompt_ids, params, 1, request_id, inputs)[0]

    def add_siblings(self, prompt_ids: list[int], params: SamplingParams, count: int, request_id: str = "",
                     inputs: Any = None) -> list[Sequence]:
        """Queue `count` sequences of one prompt that share its prefill; each samples with its own
        generator (seed, seed + 1, ... when seeded)."""
        if not self.alive:
            raise EngineError("the engine is not running")
        if count > self.scheduler.max_running:
            raise ValueError(f"{count} sequences cannot run together in a batch of {self.scheduler.max_running}")
        seqs = [self._sequence(prompt_ids, params, request_id, inputs, index) for index in range(count)]
        for sibling in seqs[1:]:
            sibling.prefix_source = seqs[0]
        self.scheduler.add(seqs)
        self._wakeup.set()
        return seqs

    def _sequence(self, prompt_ids: list[int], params: SamplingParams, request_id: str, inputs: Any,
                  index: int) -> Sequence:
        seq = Sequence(prompt_ids, params, IncrementalDetokenizer(self.tokenizer, prompt_ids),
                       self.eos_token_ids, request_id, inputs=inputs)
        seed = (params.seed + index) % 2**64 if params.seed is not None else secrets.randbits(63)
        seq.generator = torch.Generator(self.runner.device).manual_seed(seed)
        return seq

    async def on_step_thread(self, function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run other torch work (e.g. feature extraction) on the step thread, between steps (see _run_step)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, partial(function, *args, **kwargs))

    def cancel(self, seq: Sequence) -> None:
        if not seq.finished:
            seq.cancelled = True
            self._wakeup.set()

    async def stream(self, seq: Sequence) -> AsyncIterator[Delta]:
        """Yield the sequence's deltas until it finishes; leaving early cancels it."""
        try:
            while True:
                delta = await seq.outputs.get()
                yield delta
                if delta.finish_reason:
                    return
        finally:
            self.cancel(seq)

    async def _loop(self) -> None:
        while True:
            if self.scheduler.idle:
                self._wakeup.clear()
                await self._wakeup.wait()
            await self._step()
            await asyncio.sleep(self.microsleep)

    async def _step(self) -> None:
        self.scheduler.drop_cancelled()
        spans = self.scheduler.plan()
        if not spans:
            if self.scheduler.waiting and not self.scheduler.running:  # it cannot fit even with nothing else
                self._fail([self.scheduler.waiting[0]], MemoryError("the request does not fit in the KV memory"))
            return
        try:
            tokens = await asyncio.get_running_loop().run_in_executor(self._executor, self._run_step, spans)
            self.scheduler.finished_step(spans)
            self._deliver([span.seq for span in spans if span.samples], tokens)
        except Exception as error:
            self._fail(list(self.scheduler.running), error)
        self.steps += 1

    def _run_step(self, spans: list[Span]) -> list[TokenLogprob]:
        """On the step thread: every torch call stays on this one thread, since each thread that calls
        torch gets its own OpenMP pool, whose spinning workers would slow the forward down."""
        self.scheduler.memory.apply_pending()
        if self.profiler:
            return self.profiler.run(spans, self.runner.step)
        return self.runner.step(spans)

    def _deliver(self, seqs: list[Sequence], tokens: list[TokenLogprob]) -> None:
        for seq, token in zip(seqs, tokens):
            if not seq.cancelled:
                seq.outputs.put_nowait(seq.append_token(token))
        # only once every row has its token: moving a row copies its cached length
        for seq in seqs:
            if seq.finished:
                self.scheduler.remove(seq)

    def _fail(self, seqs: list[Sequence], error: BaseException) -> None:
        """Fail these sequences (all running ones after a failed step: their K/V may be half written)."""
        logger.error("engine step failed for requests %s", sorted({s.request_id for s in seqs}), exc_info=error)
        for seq in seqs:
            self.scheduler.remove(seq, keep=False)
            seq.outputs.put_nowait(Delta("", [], "error"))
