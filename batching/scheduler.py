"""Who runs next: a bounded waiting queue, and running sequences packed into KV rows 0..B-1."""

from __future__ import annotations

import itertools
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
        self.pending_moves: list[tuple[int, int, int]] = []

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running

    def add(self, seqs: list[Sequence]) -> None:
        """Queue sequences together (siblings stay adjacent), or none of them if they do not fit."""
        if len(self.waiting) + len(self.running) + len(seqs) > self.max_pending:
            raise QueueFullError(f"the server is at its limit of {self.max_pending} concurrent sequences")
        self.waiting.extend(seqs)

    def admit(self) -> list[Sequence]:
        """Move waiting sequences into free rows, within the prefill token budget (at least one).
        Siblings that share a prefix are admitted together with their source."""
        admitted: list[Sequence] = []
        budget = self.max_prefill_tokens
        while self.waiting:
            group = self._next_group()
            if len(self.running) + len(group) > self.max_running:
                break
            if admitted and len(group[0].prompt_ids) > budget:
                break
            budget -= len(group[0].prompt_ids)
            for seq in group:
                self.waiting.popleft()
                seq.row = len(self.running)
                seq.status = Status.RUNNING
                self.running.append(seq)
                admitted.append(seq)
        return admitted

    def _next_group(self) -> list[Sequence]:
        head = self.waiting[0]
        group = [head]
        for seq in itertools.islice(self.waiting, 1, None):
            if seq.prefix_source is not head:
                break
            group.append(seq)
        return group

    def remove(self, seq: Sequence) -> None:
        """Take a sequence out wherever it is; the last running row moves into its row (the copy
        itself waits for apply_moves, so that all tensor work stays on the step thread)."""
        if seq.status is Status.WAITING:
            self.waiting.remove(seq)
        elif seq.row >= 0:
            last = self.running.pop()
            if last is not seq:
                self.pending_moves.append((last.row, seq.row, last.length - 1))
                last.row = seq.row
                self.running[seq.row] = last
        seq.row = -1
        seq.status = Status.FINISHED
        if not self.running:
            self.pending_moves.clear()
            self.cache.release()

    def apply_moves(self) -> None:
        """Carry out the row moves that removals queued, in order (before the next forward)."""
        for source, target, length in self.pending_moves:
            self.cache.move_row(source, target, length)
        self.pending_moves.clear()

    def reset(self) -> None:
        """Forget all running sequences and their KV memory (after a failed step)."""
        for seq in self.running:
            seq.row = -1
            seq.status = Status.FINISHED
        self.running.clear()
        self.pending_moves.clear()
        self.cache.release()

    def drop_cancelled(self) -> list[Sequence]:
        cancelled = [s for s in (*self.waiting, *self.running) if s.cancelled]
        for seq in cancelled:
            self.remove(seq)
        return cancelled
