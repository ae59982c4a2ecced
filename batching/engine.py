"""The continuous-batching loop: admit every tick, run one step off the event loop, route tokens back.

Faults stay as small as they can: a step that raises is retried on halves of its rows until the rows that
cause it are found, and only their requests fail (the others' K/V past what they had computed are simply
written again); running out of memory preempts the most recent half of the rows and lowers the row limit;
a step that outlives the step timeout, or a failure of the loop itself, stops the engine (`fault` says why)."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, AsyncIterator, Callable

import torch

from batching.detokenizer import Decoder, IncrementalDetokenizer
from batching.failpoints import Failpoints
from batching.profiler import StepProfiler
from batching.runner import ModelRunner
from batching.scheduler import Scheduler, Span
from batching.sequence import Delta, Pooled, SamplingParams, Sequence, SequenceInputs, TokenLogprob
from batching.speculative import DraftStats
from batching.torch_thread import on_torch_thread

if TYPE_CHECKING:  # peft is imported only where adapters are read
    from batching.lora_adapters import LoraAdapter

logger = logging.getLogger("batchwise.engine")


class EngineError(RuntimeError):
    pass


class EngineWedged(EngineError):
    """A step ran past the step timeout: its thread cannot be stopped, so neither can the engine go on."""


@dataclass
class StepOutcome:
    done: list[Span]
    tokens: list[list[TokenLogprob | Pooled]]  # what each span of `done` that samples or pools emits, in order
    failed: list[tuple[Sequence, BaseException]]

    def __add__(self, other: StepOutcome) -> StepOutcome:
        return StepOutcome(self.done + other.done, self.tokens + other.tokens, self.failed + other.failed)


@dataclass
class EngineStats:
    running: int
    waiting: int
    steps: int
    alive: bool
    drafts: DraftStats | None = None  # what speculation did, where the engine drafts


class Engine:
    def __init__(self, runner: ModelRunner, scheduler: Scheduler, tokenizer: Decoder,
                 eos_token_ids: frozenset[int], microsleep: float, profiler: StepProfiler | None = None,
                 step_timeout: float | None = None, failpoints: Failpoints | None = None) -> None:
        self.runner = runner
        self.profiler = profiler
        self.step_timeout = step_timeout
        self.failpoints = failpoints
        self.fault: str | None = None  # why the engine stopped by itself
        self.scheduler = scheduler
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.microsleep = microsleep
        self.steps = 0
        self.drafts = DraftStats() if scheduler.speculative is not None else None
        self.on_step: Callable[[float], None] | None = None  # told each step's seconds (metrics)
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="batchwise-engine")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self.failpoints:
            self.failpoints.release()
        if self.profiler:
            self.profiler.report()

    async def stopped(self) -> str | None:
        """Wait until the loop ends: its fault, or None when it was stopped."""
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
        return self.fault

    @property
    def alive(self) -> bool:
        return self._task is not None and not self._task.done()

    @property
    def max_sequence_tokens(self) -> int:
        """The most tokens (prompt plus completion) one sequence can hold in this engine's KV memory."""
        return self.scheduler.memory.sequence_capacity

    def stats(self) -> EngineStats:
        return EngineStats(len(self.scheduler.running), len(self.scheduler.waiting), self.steps, self.alive,
                           self.drafts)

    def add(self, prompt_ids: list[int], params: SamplingParams, request_id: str = "", inputs: SequenceInputs = None,
            user: str = "", adapter: LoraAdapter | None = None) -> Sequence:
        """Queue a sequence; raises QueueFullError when running plus waiting is at the limit."""
        return self.add_siblings(prompt_ids, params, 1, request_id, inputs, user, adapter)[0]

    def add_siblings(self, prompt_ids: list[int], params: SamplingParams, count: int, request_id: str = "",
                     inputs: SequenceInputs = None, user: str = "", adapter: LoraAdapter | None = None
                     ) -> list[Sequence]:
        """Queue `count` sequences of one prompt that share its prefill; each samples with its own
        generator (seed, seed + 1, ... when seeded); `adapter`: the LoRA adapter they run with."""
        if not self.alive:
            raise EngineError("the engine is not running")
        if count > self.scheduler.max_running:
            raise ValueError(f"{count} sequences cannot run together in a batch of {self.scheduler.max_running}")
        if len(prompt_ids) + params.max_tokens > self.max_sequence_tokens:  # it would wait forever
            raise ValueError(f"{len(prompt_ids)} prompt tokens and {params.max_tokens} to generate exceed the "
                             f"{self.max_sequence_tokens} tokens one sequence can hold")
        seqs = [self._sequence(prompt_ids, params, request_id, inputs, index, user) for index in range(count)]
        for seq in seqs:
            seq.adapter = adapter
        for sibling in seqs[1:]:
            sibling.prefix_source = seqs[0]
        self.scheduler.add(seqs)
        self._wakeup.set()
        return seqs

    def _sequence(self, prompt_ids: list[int], params: SamplingParams, request_id: str, inputs: SequenceInputs,
                  index: int, user: str) -> Sequence:
        detokenizer = IncrementalDetokenizer(self.tokenizer, prompt_ids, dict(params.shown_special_tokens))
        seq = Sequence(prompt_ids, params, detokenizer,
                       self.eos_token_ids, request_id, user, inputs=inputs)
        seed = (params.seed + index) % 2**64 if params.seed is not None else secrets.randbits(63)
        seq.generator = torch.Generator(self.runner.device).manual_seed(seed)
        return seq

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
        try:
            while True:
                if self.scheduler.idle:
                    self._wakeup.clear()
                    await self._wakeup.wait()
                await self._step()
                await asyncio.sleep(self.microsleep)
        except Exception as error:
            self.fault = str(error) or type(error).__name__
            logger.critical("the engine stopped: %s", self.fault, exc_info=not isinstance(error, EngineWedged))
            for seq in [*self.scheduler.running, *self.scheduler.waiting]:
                seq.outputs.put_nowait(Delta("", [], "error", error=f"the engine stopped: {self.fault}"))

    async def _step(self) -> None:
        self.scheduler.drop_cancelled()
        spans = self.scheduler.plan()
        if not spans:
            if self.scheduler.waiting and not self.scheduler.running:  # it cannot fit even with nothing else
                self._fail(self.scheduler.waiting[0], MemoryError("the request does not fit in the KV memory"))
            return
        started = time.perf_counter()
        outcome = await self._attempt(spans)
        seconds = time.perf_counter() - started
        if self.on_step:
            self.on_step(seconds)
        self.scheduler.finished_step(outcome.done, seconds)
        for seq, error in outcome.failed:
            self._fail(seq, error)
        self._deliver([span for span in outcome.done if span.emits], outcome.tokens)
        self.steps += 1

    async def _attempt(self, spans: list[Span]) -> StepOutcome:
        """Run the step; when it raises, find the rows that make it fail by running halves of it."""
        try:
            return StepOutcome(spans, await self._run_within_timeout(spans), [])
        except EngineWedged:
            raise
        except torch.OutOfMemoryError as error:
            return await self._shed_rows(spans, error)
        except Exception as error:
            if len(spans) == 1:
                return StepOutcome([], [], [(spans[0].seq, error)])
            logger.warning("a step of %d rows failed (%s): running it in halves to find the rows that fail",
                           len(spans), error)
            half = len(spans) // 2
            return await self._attempt(spans[:half]) + await self._attempt(spans[half:])

    async def _shed_rows(self, spans: list[Span], error: torch.OutOfMemoryError) -> StepOutcome:
        """Out of memory: preempt the most recently queued half of the rows, run no more rows than the rest
        for a while, and retry; a row that runs out of memory alone fails."""
        if len(spans) == 1:
            seq = spans[0].seq
            return StepOutcome([], [], [(seq, MemoryError(
                f"out of memory running this request alone ({seq.length} tokens, {spans[0].end - spans[0].start} "
                f"of them in this step): {error}"))])
        newest = sorted(spans, key=lambda span: span.seq.seq_id)[len(spans) // 2:]
        for span in newest:
            self.scheduler.preempt(span.seq)
        kept = [span for span in spans if span not in newest]
        self.scheduler.limit_rows(len(kept))
        logger.warning("out of memory in a step of %d rows (%s): preempted requests %s, at most %d rows for now",
                       len(spans), error, sorted({span.seq.request_id for span in newest}), self.scheduler.row_limit)
        return await self._attempt(kept)

    async def _run_within_timeout(self, spans: list[Span]) -> list[list[TokenLogprob | Pooled]]:
        step = asyncio.ensure_future(on_torch_thread(self._run_step, spans))
        try:
            return await asyncio.wait_for(asyncio.shield(step), self.step_timeout)
        except TimeoutError:
            raise EngineWedged(f"a step of {len(spans)} rows ran for more than the step timeout of "
                               f"{self.step_timeout:g} s") from None

    def _run_step(self, spans: list[Span]) -> list[list[TokenLogprob | Pooled]]:
        """On the torch thread (batching.torch_thread), as all of the process's torch work."""
        self.scheduler.memory.apply_pending()
        if self.failpoints:
            self.failpoints.trigger(spans)
        if self.profiler:
            return self.profiler.run(spans, self.runner.step)
        return self.runner.step(spans)

    def _deliver(self, spans: list[Span], emitted: list[list[TokenLogprob | Pooled]]) -> None:
        broken = []
        for span, tokens in zip(spans, emitted):
            seq = span.seq
            if span.draft:
                self.drafts.count(span.draft, len(tokens))
            if seq.cancelled:
                continue
            try:
                self._append(seq, tokens)
            except Exception as error:  # e.g. its detokeniser or stop strings: that request alone fails
                broken.append((seq, error))
                continue
            if span.draft:
                self.scheduler.keep_draft(seq)
        # only once every row has its token: moving a row copies its cached length
        for seq, error in broken:
            self._fail(seq, error)
        for span in spans:
            if span.seq.finished:
                self.scheduler.remove(span.seq)

    @staticmethod
    def _append(seq: Sequence, tokens: list[TokenLogprob | Pooled]) -> None:
        """Append the tokens one by one until the sequence finishes (the rest are dropped); a pooled sequence's
        embedding finishes it."""
        for token in tokens:
            seq.outputs.put_nowait(seq.finish_pooled(token) if isinstance(token, Pooled) else seq.append_token(token))
            if seq.finished:
                return

    def _fail(self, seq: Sequence, error: BaseException) -> None:
        """Fail one sequence; its K/V are dropped (a failed step may have half written them)."""
        logger.error("engine step failed for request %s: %s", seq.request_id, error,
                     exc_info=not isinstance(error, MemoryError))
        self.scheduler.remove(seq, keep=False)
        seq.outputs.put_nowait(Delta("", [], "error", error=str(error)))
