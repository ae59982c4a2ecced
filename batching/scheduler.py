"""Who runs in the next step, and how much of each: a bounded waiting queue, and running sequences that each
compute one span of their tokens per step (one token when decoding, the next chunk of a prompt otherwise).

While sequences are decoding, a long prompt's chunks stay within `step_tokens` (or, where chunks are sized by
measured step time, within what keeps a step at a known multiple of the decoding rows' own: batching.chunk_sizer),
so it never stalls them for more than a small chunk; prompts that finish in the step may also take a token for
each row the batch leaves free (no step costs more than a full batch decoding plus `step_tokens`); with nothing
decoding, a prompt takes up to `solo_tokens` per step.
The budget counts what a token costs: a prompt token at position p also attends to the p before it,
so it counts 1 + p x `attention_cost` (attention's cost per earlier token relative to the token's linear
layers), and the late chunks of a long prompt take fewer tokens than its first. In batch-invariant mode
every prompt is cut at fixed multiples of `step_tokens` instead, so how it is cut (and so every
floating-point sum) never depends on what else is running.

With speculative decoding, while few sequences are in the engine (SpeculativeSettings.max_sequences, counting
those decoding, those still in their prompts and those waiting; a request's n choices are n sequences), a decoding
row may also verify a draft of the tokens after its last one (batching.speculative), in KV memory reserved without
preempting anyone; after the step only the K/V of the draft tokens it accepted count as computed. Counting every
sequence, not only the step's decoding rows, keeps drafts out of the steps where a busy server's rows are few only
for a moment (a wave of requests ending while the next wave's prompts queue): drafting there would delay those
prompts for little.

KV memory is asked before a sequence is admitted or grows; when it runs out, the most recently admitted
sequence is preempted: its K/V are freed and its tokens recomputed when it is admitted again (its output so
far is kept and streaming simply pauses)."""

from __future__ import annotations

import itertools
import logging
import math
from collections import deque
from dataclasses import dataclass, replace
from typing import Protocol

from batching.chunk_sizer import ChunkSizer
from batching.sequence import Sequence, Status
from batching.speculative import SpeculativeSettings, drafts_allowed

logger = logging.getLogger("batchwise.scheduler")

ROW_RECOVERY_STEPS = 64  # good steps after which a row limit set by running out of memory rises by one


class QueueFullError(RuntimeError):
    pass


class KVMemory(Protocol):
    sequence_capacity: int  # the most tokens one sequence can ever hold

    def admit(self, seq: Sequence) -> bool: ...
    def reserve(self, seq: Sequence, tokens: int) -> bool: ...
    def record(self, seq: Sequence) -> None: ...
    def release(self, seq: Sequence, keep: bool) -> None: ...
    def move_row(self, seq: Sequence, target: int) -> None: ...
    def apply_pending(self) -> None: ...
    def idle(self) -> None: ...


@dataclass
class Span:
    """The tokens seq.all_ids[start:end] that one step computes for a sequence, then its draft's, if any: tokens
    proposed to follow the sequence's last one, which the step verifies (batching.speculative). The scheduler gives
    a decoding span room for a draft (KV memory reserved); the runner's drafter proposes it on the torch thread."""
    seq: Sequence
    start: int
    end: int
    draft_room: int = 0
    draft: tuple[int, ...] = ()

    @property
    def stop(self) -> int:
        """The position after the last one the step computes."""
        return self.end + len(self.draft)

    @property
    def samples(self) -> bool:
        """The span reaches the sequence's last known token, so the step samples its next one (unless it pools)."""
        return self.end == self.seq.length and not self.seq.params.pooled

    @property
    def pools(self) -> bool:
        """The span reaches the end of a pooled sequence's prompt, so the step emits its embedding."""
        return self.end == self.seq.length and self.seq.params.pooled

    @property
    def emits(self) -> bool:
        return self.samples or self.pools


class Scheduler:
    def __init__(self, memory: KVMemory, max_running: int, max_pending: int, step_tokens: int,
                 solo_tokens: int | None = None, batch_invariant: bool = False, attention_cost: float = 0.0,
                 speculative: SpeculativeSettings | None = None, timed_chunks: bool = False) -> None:
        """timed_chunks: size prompt chunks beside decoding rows by measured step time, up to step_tokens."""
        self.memory = memory
        self.speculative = speculative
        self.max_running = max_running
        self.max_pending = max_pending
        self.step_tokens = step_tokens
        self.solo_tokens = max(solo_tokens or step_tokens, step_tokens)
        self.batch_invariant = batch_invariant
        self.attention_cost = attention_cost
        self.chunk_sizer = ChunkSizer(step_tokens) if timed_chunks and not batch_invariant else None
        self._planned: tuple[int, float] | None = None  # the last plan's decoding rows and prompt cost, if undrafted
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # running[i].row == i
        self.preemptions = 0
        self.row_limit = max_running  # lowered after running out of memory, then recovered step by step
        self._steps_at_limit = 0

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running

    @property
    def sequences(self) -> int:
        """Sequences in the engine: running (decoding or in their prompts) and waiting."""
        return len(self.running) + len(self.waiting)

    def uses_adapter(self, slot: int) -> bool:
        """Whether a running or waiting sequence uses the LoRA adapter slot (safe off the event loop: the lists are
        copied whole before they are read)."""
        return any(seq.adapter_slot == slot for seq in [*self.running, *self.waiting])

    def add(self, seqs: list[Sequence]) -> None:
        """Queue sequences together (siblings stay adjacent), or none of them if they do not fit."""
        if self.sequences + len(seqs) > self.max_pending:
            raise QueueFullError(f"the server is at its limit of {self.max_pending} concurrent sequences")
        self.waiting.extend(seqs)

    def plan(self) -> list[Span]:
        """The spans of the next step: every running sequence's next span that fits, then newly admitted ones."""
        spans: list[Span] = []
        for seq in [s for s in self.running if s.decoding]:
            if seq.status is Status.RUNNING and self._reserve(seq, seq.length):  # else preempted for an older one
                spans.append(Span(seq, seq.computed, seq.length))
        decoding_rows = len(spans)
        budget, finishing_only = self._prompt_budget(decoding_rows)
        full_budget = budget
        for seq in [s for s in self.running if not s.decoding]:
            budget = self._plan_span(seq, spans, budget, finishing_only)
        while self.waiting and len(self.running) < self.row_limit and budget >= 1:
            seq = self.waiting[0]
            if not self._siblings_source_ready(seq) or not self.memory.admit(seq):
                break
            self.waiting.popleft()
            seq.row = len(self.running)
            seq.status = Status.RUNNING
            self.running.append(seq)
            if seq.prefix_source is not None:
                seq.prompt_logprobs = seq.prefix_source.prompt_logprobs
            budget = self._plan_span(seq, spans, budget, finishing_only)
            if seq.status is not Status.RUNNING:
                break
        if self.speculative is not None and self.sequences <= self.speculative.max_sequences:
            spans = [self._drafted(span) if span.seq.decoding else span for span in spans]
        drafted = any(span.draft_room for span in spans)
        self._planned = None if drafted else (decoding_rows, full_budget - budget)
        return spans

    def _drafted(self, span: Span) -> Span:
        """The decoding span with room for a draft, where the sequence may draft and the KV memory left once the
        step's prompts have theirs holds it, without preempting anyone; a draft never reaches past max_tokens (its
        verification emits one token more than it holds)."""
        seq = span.seq
        limit = min(self.speculative.tokens, seq.params.max_tokens - len(seq.output_ids) - 1,
                    self.memory.sequence_capacity - seq.length)
        if limit >= 1 and drafts_allowed(seq) and self.memory.reserve(seq, seq.length + limit):
            return replace(span, draft_room=limit)
        return span

    def _prompt_budget(self, decoding_rows: int) -> tuple[int, int]:
        """The step's prompt tokens, and the share of them that only prompts finishing in the step may take.
        Beside decoding rows: `step_tokens`, and a token for each row the batch leaves free, for prompts that
        finish (no step costs more than a full batch decoding plus `step_tokens`, and a half-empty batch fills
        faster), while a long prompt's chunks stay within `step_tokens`, so the rows beside it keep their pace."""
        if decoding_rows or self.batch_invariant:
            free_rows = max(0, self.row_limit - decoding_rows)
            chunk = self.step_tokens if self.chunk_sizer is None else self.chunk_sizer.tokens(decoding_rows)
            return chunk + free_rows, free_rows
        return self.solo_tokens, 0

    def _plan_span(self, seq: Sequence, spans: list[Span], budget: float, finishing_only: int) -> float:
        """Plan the next chunk of a sequence's prompt (or of its recomputation after preemption)."""
        if seq.status is not Status.RUNNING:
            return budget
        start = seq.computed
        if self.batch_invariant:
            end = min(seq.length, (start // self.step_tokens + 1) * self.step_tokens)
            cost = end - start
        else:
            end = start + self._affordable(start, seq.length - start, budget)
            if end < seq.length:  # a chunk that leaves some of the prompt for later steps
                end = start + self._affordable(start, seq.length - start, budget - finishing_only)
            cost = self._cost(start, end)
        if cost > budget or (end < seq.length and cost > budget - finishing_only) or not self._reserve(seq, end):
            return budget
        spans.append(Span(seq, start, end))
        return budget - cost

    def _cost(self, start: int, end: int) -> float:
        """Prompt tokens start..end-1, each counted 1 + position x attention_cost."""
        tokens = end - start
        return tokens + self.attention_cost * (tokens * start + tokens * (tokens - 1) / 2)

    def _affordable(self, start: int, remaining: int, budget: float) -> int:
        """The most of the remaining tokens from `start` on whose cost fits the budget (at least one)."""
        a = self.attention_cost
        if not a:
            return max(1, min(remaining, int(budget)))
        b = 1 + a * start - a / 2  # cost(n) = a/2 n^2 + b n
        return max(1, min(remaining, int((-b + math.sqrt(b * b + 2 * a * budget)) / a)))

    def _reserve(self, seq: Sequence, tokens: int) -> bool:
        """Room for the sequence's first `tokens` positions, preempting younger sequences (or itself) if need be."""
        while not self.memory.reserve(seq, tokens):
            victim = self.running[-1]
            self.preempt(victim)
            if victim is seq:
                return False
        return True

    def preempt(self, seq: Sequence) -> None:
        logger.info("KV memory is full: preempting request %s (%d tokens) until memory frees",
                    seq.request_id, seq.length)
        self._leave_running(seq, keep=False)
        seq.computed = 0
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.preemptions += 1

    def _siblings_source_ready(self, seq: Sequence) -> bool:
        """Siblings wait for their source's prompt, whose K/V they copy; a source gone before that frees them."""
        source = seq.prefix_source
        if source is not None and source.status is Status.FINISHED:
            seq.prefix_source = None
        return seq.prefix_source is None or (source.status is Status.RUNNING
                                             and source.computed >= len(source.prompt_ids))

    def finished_step(self, spans: list[Span], seconds: float | None = None) -> None:
        """After the step (which took `seconds`, where measured): each span's tokens are computed."""
        if self.chunk_sizer is not None and seconds is not None and self._planned is not None:
            self.chunk_sizer.observe(seconds, *self._planned)
        for span in spans:
            if span.seq.status is Status.RUNNING:
                span.seq.computed = span.end
                self.memory.record(span.seq)
        if self.row_limit < self.max_running:
            self._steps_at_limit += 1
            if self._steps_at_limit >= ROW_RECOVERY_STEPS:
                self.row_limit += 1
                self._steps_at_limit = 0

    def keep_draft(self, seq: Sequence) -> None:
        """After a verified draft's tokens are appended: the tokens it appended but the last are draft tokens the
        step computed, so the sequence's K/V are its tokens but the last, as after any step; the K/V of the draft
        tokens it did not append are rolled back, never counted nor cached, and written over by later steps."""
        seq.computed = seq.length - 1
        if seq.status is Status.RUNNING:
            self.memory.record(seq)

    def limit_rows(self, rows: int) -> None:
        """Run at most `rows` sequences (at least one) until steps have gone well for a while."""
        self.row_limit = max(1, min(self.row_limit, rows))
        self._steps_at_limit = 0

    def remove(self, seq: Sequence, keep: bool = True) -> None:
        """Take a sequence out wherever it is; its K/V are kept for the prefix cache when `keep`."""
        if seq.row >= 0:  # running (a sequence that just finished already says so in its status)
            self._leave_running(seq, keep)
        elif seq.status is Status.WAITING:
            self.waiting.remove(seq)
        seq.status = Status.FINISHED

    def _leave_running(self, seq: Sequence, keep: bool) -> None:
        """Free the sequence's memory and its row; the last running row moves into it (after the release, so
        that a static cache copies the leaving row's K/V out before another row's overwrite them)."""
        self.memory.release(seq, keep)
        last = self.running.pop()
        if last is not seq:
            self.memory.move_row(last, seq.row)
            last.row = seq.row
            self.running[seq.row] = last
        seq.row = -1
        if not self.running:
            self.memory.idle()

    def drop_cancelled(self) -> list[Sequence]:
        cancelled = [s for s in itertools.chain(self.waiting, self.running) if s.cancelled]
        for seq in cancelled:
            self.remove(seq)
        return cancelled
