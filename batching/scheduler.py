"""Who runs in the next step, and how much of each: a bounded waiting queue, and running sequences that each
compute one span of their tokens per step (one token when decoding, the next chunk of a prompt otherwise).

Prompt chunks end on fixed multiples of `chunk_tokens`, so how a prompt is cut never depends on what else
is running; prompt tokens per step stay within `step_tokens`, so a long prompt never stalls the decoding
rows for more than a chunk. KV memory is asked before a sequence is admitted or grows; when it runs out,
the most recently admitted sequence is preempted: its K/V are freed and its tokens recomputed when it is
admitted again (its output so far is kept and streaming simply pauses)."""

from __future__ import annotations

import itertools
import logging
from collections import deque
from dataclasses import dataclass
from typing import Protocol

from batching.sequence import Sequence, Status

logger = logging.getLogger("batchwise.scheduler")


class QueueFullError(RuntimeError):
    pass


class KVMemory(Protocol):
    tokens: int  # the most tokens one sequence can ever hold

    def admit(self, seq: Sequence) -> bool: ...
    def reserve(self, seq: Sequence, tokens: int) -> bool: ...
    def record(self, seq: Sequence) -> None: ...
    def release(self, seq: Sequence, keep: bool) -> None: ...
    def move_row(self, seq: Sequence, target: int) -> None: ...
    def apply_pending(self) -> None: ...
    def idle(self) -> None: ...


@dataclass
class Span:
    """The tokens seq.all_ids[start:end] that one step computes for a sequence."""
    seq: Sequence
    start: int
    end: int

    @property
    def samples(self) -> bool:
        """The span reaches the sequence's last known token, so the step samples its next one."""
        return self.end == self.seq.length


class Scheduler:
    def __init__(self, memory: KVMemory, max_running: int, max_pending: int, step_tokens: int,
                 chunk_tokens: int | None = None) -> None:
        self.memory = memory
        self.max_running = max_running
        self.max_pending = max_pending
        self.step_tokens = step_tokens
        self.chunk_tokens = chunk_tokens or step_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # running[i].row == i
        self.preemptions = 0

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running

    def add(self, seqs: list[Sequence]) -> None:
        """Queue sequences together (siblings stay adjacent), or none of them if they do not fit."""
        if len(self.waiting) + len(self.running) + len(seqs) > self.max_pending:
            raise QueueFullError(f"the server is at its limit of {self.max_pending} concurrent sequences")
        self.waiting.extend(seqs)

    def plan(self) -> list[Span]:
        """The spans of the next step: every running sequence's next span that fits, then newly admitted ones."""
        spans: list[Span] = []
        budget = self.step_tokens
        for seq in list(self.running):
            if seq.status is not Status.RUNNING:
                continue  # preempted to make room for an older sequence
            budget = self._plan_span(seq, spans, budget)
        while self.waiting and len(self.running) < self.max_running and budget > 0:
            seq = self.waiting[0]
            if not self._siblings_source_ready(seq) or not self.memory.admit(seq):
                break
            self.waiting.popleft()
            seq.row = len(self.running)
            seq.status = Status.RUNNING
            self.running.append(seq)
            if seq.prefix_source is not None:
                seq.prompt_logprobs = seq.prefix_source.prompt_logprobs
            budget = self._plan_span(seq, spans, budget)
            if seq.status is not Status.RUNNING:
                break
        return spans

    def _plan_span(self, seq: Sequence, spans: list[Span], budget: int) -> int:
        end = self._span_end(seq)
        prompt_tokens = 0 if end - seq.computed == 1 and seq.output_ids else end - seq.computed
        if prompt_tokens > budget or not self._reserve(seq, end):
            return budget
        spans.append(Span(seq, seq.computed, end))
        return budget - prompt_tokens

    def _span_end(self, seq: Sequence) -> int:
        next_boundary = (seq.computed // self.chunk_tokens + 1) * self.chunk_tokens
        return min(seq.length, next_boundary)

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

    def finished_step(self, spans: list[Span]) -> None:
        """After the step: each span's tokens are computed."""
        for span in spans:
            if span.seq.status is Status.RUNNING:
                span.seq.computed = span.end
                self.memory.record(span.seq)

    def remove(self, seq: Sequence, keep: bool = True) -> None:
        """Take a sequence out wherever it is; its K/V are kept for the prefix cache when `keep`."""
        if seq.row >= 0:  # running (a sequence that just finished already says so in its status)
            self._leave_running(seq, keep)
        elif seq.status is Status.WAITING:
            self.waiting.remove(seq)
        seq.status = Status.FINISHED

    def _leave_running(self, seq: Sequence, keep: bool) -> None:
        """Free the sequence's memory and its row; the last running row moves into it."""
        last = self.running.pop()
        if last is not seq:
            self.memory.move_row(last, seq.row)
            last.row = seq.row
            self.running[seq.row] = last
        self.memory.release(seq, keep)
        seq.row = -1
        if not self.running:
            self.memory.idle()

    def drop_cancelled(self) -> list[Sequence]:
        cancelled = [s for s in itertools.chain(self.waiting, self.running) if s.cancelled]
        for seq in cancelled:
            self.remove(seq)
        return cancelled
