"""Per-row memory for encoder-decoder decoding (Whisper, T5, BART): the growing self-attention K/V of each row,
and the cross-attention K/V of the row's encoder input, projected from the encoder once when the sequence is
admitted. Running sequences occupy rows 0..B-1 (the scheduler moves the last row into a freed one), so a
decode step reads every row's cross-attention K/V as one batch. A sequence decoded with beam search has one
self-attention row per beam (row r, beam b: self-attention row r x beams + b), and its beams share its
cross-attention K/V. It serves the scheduler as its KV memory: every row can hold `max_length` decoder
tokens and `max_source` encoder positions, so rows never run out and nothing is preempted."""

from __future__ import annotations

from typing import NamedTuple

import torch

from batching.kv_cache import RowKVCache
from batching.sequence import Sequence


class RowMove(NamedTuple):
    """A sequence's move to another row: its first `length` self-attention positions (in each beam's row) and its
    cross-attention K/V, from row `source` to row `target`."""
    source: int
    target: int
    length: int


class EncoderDecoderRows:
    def __init__(self, max_rows: int, max_length: int, max_source: int, beams: int = 1, static: bool = False
                 ) -> None:
        self.max_rows = max_rows
        self.beams = beams
        self.static = static
        # one more self-attention row, where padding rows write (a static step's, a batch-invariant step's)
        self.self_attention = RowKVCache(max_rows * beams + 1, max_length)
        self.cross = RowKVCache(max_rows, max_source)
        self.cross_lengths = [0] * max_rows  # encoder positions each row attends to
        self.pending_moves: list[RowMove] = []
        self.held: dict[int, int] = {}  # decoder positions each running sequence has computed, by sequence id

    @property
    def scratch_row(self) -> int:
        return self.max_rows * self.beams

    def allocate(self, layers: int, heads: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> int:
        """A static cache: every tensor at its full size now, never grown, moved or given back; returns bytes."""
        self.self_attention.allocate(layers, heads, head_dim, dtype, device)
        self.cross.allocate(layers, heads, head_dim, dtype, device)
        tensors = [t for cache in (self.self_attention, self.cross) for pair in cache.layers.values() for t in pair]
        return sum(t.numel() * t.element_size() for t in tensors)

    def beam_row(self, row: int, beam: int = 0) -> int:
        """The self-attention row of a sequence's beam."""
        return row * self.beams + beam

    def reorder_beams(self, row: int, parents: list[int], length: int) -> None:
        """On the torch thread: beam b of the sequence in `row` continues beam parents[b], so it takes that beam's
        first `length` self-attention K/V."""
        moved = [(parent, beam) for beam, parent in enumerate(parents) if parent != beam]
        if moved:
            self.self_attention.copy_rows([self.beam_row(row, parent) for parent, _ in moved],
                                          [self.beam_row(row, beam) for _, beam in moved], length)

    def grow_rows(self, length: int) -> None:
        """On the torch thread: room for `length` self-attention positions in every row."""
        self.self_attention.reserve(length)

    def store_cross(self, layer: int, rows: list[int], keys: torch.Tensor, values: torch.Tensor,
                    lengths: list[int]) -> None:
        """keys/values: [len(rows), heads, positions, head_dim], of which row i attends to the first lengths[i]."""
        self.cross.reserve(keys.shape[2])
        self.cross.store(layer, torch.tensor(rows, device=keys.device), keys, values)
        for row, length in zip(rows, lengths):
            self.cross_lengths[row] = length

    def share_cross(self, source: int, target: int) -> None:
        """Row `target` attends to the same encoder input as row `source` (a sibling of the same prompt)."""
        self.cross.copy_rows([source], [target], self.cross_lengths[source])
        self.cross_lengths[target] = self.cross_lengths[source]

    def cross_rows(self, layer: int, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows start..stop-1's cross-attention K/V, [rows, heads, positions, head_dim], as long as the longest."""
        keys, values = self.cross.layers[layer]
        length = max(self.cross_lengths[start:stop])
        return keys[start:stop, :, :length], values[start:stop, :, :length]

    # the scheduler's KV memory protocol (see batching.scheduler.KVMemory)
    @property
    def sequence_capacity(self) -> int:
        return self.self_attention.max_length

    def admit(self, seq: Sequence) -> bool:
        return True

    def reserve(self, seq: Sequence, tokens: int) -> bool:
        return tokens <= self.self_attention.max_length  # the runner grows the rows, on the torch thread

    @property
    def tokens(self) -> int:
        """Decoder positions the rows hold (the K/V budget, as metrics report it)."""
        return self.max_rows * self.self_attention.max_length

    @property
    def used_tokens(self) -> int:
        return sum(self.held.values())

    def record(self, seq: Sequence) -> None:
        self.held[seq.seq_id] = seq.computed

    def release(self, seq: Sequence, keep: bool) -> None:
        self.held.pop(seq.seq_id, None)

    def move_row(self, seq: Sequence, target: int) -> None:
        self.pending_moves.append(RowMove(seq.row, target, seq.computed))

    def apply_pending(self) -> None:
        try:
            for source, target, length in self.pending_moves:
                self._move(source, target, length)
        finally:
            self.pending_moves.clear()

    def idle(self) -> None:
        """Give all memory back (no sequence is running), unless it is static."""
        self.pending_moves.clear()
        if not self.static:
            self.self_attention.release()
            self.cross.release()

    def _move(self, source: int, target: int, length: int) -> None:
        """`length` counts the row's self-attention entries (in each of its beams)."""
        self.self_attention.copy_rows([self.beam_row(source, beam) for beam in range(self.beams)],
                                      [self.beam_row(target, beam) for beam in range(self.beams)], length)
        self.cross.copy_rows([source], [target], self.cross_lengths[source])
        self.cross_lengths[target] = self.cross_lengths[source]
