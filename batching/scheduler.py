"""Who runs next: a bounded waiting queue, and running sequences packed into KV rows 0..B-1."""

from __future__ import annotations

from collections import deque

from batching.kv_cache import RowKVCache
from batching.sequence import Sequence, Status


class QueueFullError(RuntimeError):
    pass


class Scheduler:
    def __init__(self, cache: RowKVCache, max_running: int, max_pending: int, max_prefill_tokens: int) -> None:
        self.cache = cache
        self.max_running = max_running
        self.max_pending = max_pending
        self.max_prefill_tokens = max_prefill_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running

    def add(self, seq: Sequence) -> None:
        if len(self.waiting) + len(self.running) >= self.max_pending:
            raise QueueFullError(f"the server is at its limit of {self.max_pending} concurrent requests")
        self.waiting.append(seq)

    def admit(self) -> list[Sequence]:
        """Move waiting sequences into free rows, within the prefill token budget (at least one)."""
        admitted: list[Sequence] = []
        budget = self.max_prefill_tokens
        while self.waiting and len(self.running) < self.max_running:
            seq = self.waiting[0]
            if admitted and len(seq.prompt_ids) > budget:
                break
            self.waiting.popleft()
            budget -= len(seq.prompt_ids)
            seq.row = len(self.running)
            seq.status = Status.RUNNING
            self.running.append(seq)
            admitted.append(seq)
        return admitted

    def remove(self, seq: Sequence) -> None:
        """Take a sequence out wherever it is; the last running row moves into its row."""
        if seq.status is Status.WAITING:
            self.waiting.remove(seq)
        elif seq.row >= 0:
            last = self.running.pop()
            if last is not seq:
                self.cache.move_row(last.row, seq.row, last.length - 1)
                last.row = seq.row
                self.running[seq.row] = last
        seq.row = -1
        seq.status = Status.FINISHED
        if not self.running:
            self.cache.release()

    def reset(self) -> None:
        """Forget all running sequences and their KV memory (after a failed step)."""
        for seq in self.running:
            seq.row = -1
            seq.status = Status.FINISHED
        self.running.clear()
        self.cache.release()

    def drop_cancelled(self) -> list[Sequence]:
        cancelled = [s for s in (*self.waiting, *self.running) if s.cancelled]
        for seq in cancelled:
            self.remove(seq)
        return cancelled
