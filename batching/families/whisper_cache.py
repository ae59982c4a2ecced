"""Per-row memory for Whisper decoding: the growing self-attention K/V of each row, and the cross-attention
K/V of the row's audio window, projected from the encoder once when the window is admitted. Running windows
occupy rows 0..B-1 (the scheduler moves the last row into a freed one), so a decode step reads every row's
audio K/V as one batch. It serves the scheduler as its KV memory; rows never run out, so nothing is
preempted."""

from __future__ import annotations

import torch

from batching.kv_cache import RowKVCache
from batching.sequence import Sequence


class WhisperRowCache:
    def __init__(self, max_rows: int, max_length: int) -> None:
        self.max_rows = max_rows
        self.self_attention = RowKVCache(max_rows, max_length)
        self.cross: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # layer -> [rows, heads, frames, head_dim] x2
        self.pending_moves: list[tuple[int, int, int]] = []  # (source row, target row, self-attention length)

    def grow_rows(self, length: int) -> None:
        """On the step thread: room for `length` self-attention positions in every row."""
        self.self_attention.reserve(length)

    # the scheduler's KV memory protocol (see batching.scheduler.KVMemory)
    @property
    def sequence_capacity(self) -> int:
        return self.self_attention.max_length

    def admit(self, seq: Sequence) -> bool:
        return True

    def reserve(self, seq: Sequence, tokens: int) -> bool:
        return tokens <= self.self_attention.max_length  # the runner grows the rows, on the step thread

    def record(self, seq: Sequence) -> None:
        pass

    def release(self, seq: Sequence, keep: bool) -> None:
        pass

    def move_row(self, seq: Sequence, target: int) -> None:
        self.pending_moves.append((seq.row, target, seq.computed))

    def apply_pending(self) -> None:
        try:
            for source, target, length in self.pending_moves:
                self._move(source, target, length)
        finally:
            self.pending_moves.clear()

    def idle(self) -> None:
        """Give all memory back (no window is running)."""
        self.pending_moves.clear()
        self.self_attention.release()
        self.cross.clear()

    @torch.inference_mode()
    def _move(self, source: int, target: int, length: int) -> None:
        """`length` counts the row's self-attention entries; its cross-attention K/V move whole."""
        self.self_attention.move_row(source, target, length)
        for keys, values in self.cross.values():
            keys[target] = keys[source]
            values[target] = values[source]

    def store_cross(self, layer: int, rows: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        """keys/values: [len(rows), heads, frames, head_dim]."""
        if layer not in self.cross:
            shape = (self.max_rows, *keys.shape[1:])
            # every row is written at its prefill before any step reads it, so no zero fill is needed
            self.cross[layer] = (keys.new_empty(shape), values.new_empty(shape))
        cached_keys, cached_values = self.cross[layer]
        cached_keys[rows] = keys
        cached_values[rows] = values

    def cross_rows(self, layer: int, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.cross[layer]
        return keys[start:stop], values[start:stop]
