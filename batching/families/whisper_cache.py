"""Per-row memory for Whisper decoding: the growing self-attention K/V of each row, and the cross-attention K/V
of the row's audio window, projected from the encoder once when the window is admitted. Running windows occupy
rows 0..B-1 (the scheduler moves the last row into a freed one), so a decode step reads every row's audio K/V
as one batch. A window decoded with beam search has one self-attention row per beam (window row r, beam b:
self-attention row r x beams + b), and its beams share the window's audio K/V. It serves the scheduler as its
KV memory; rows never run out, so nothing is preempted."""

from __future__ import annotations

import torch

from batching.kv_cache import RowKVCache
from batching.sequence import Sequence


class WhisperRowCache:
    def __init__(self, max_rows: int, max_length: int, beams: int = 1, static: bool = False) -> None:
        self.max_rows = max_rows
        self.beams = beams
        self.static = static
        # a static cache has one more self-attention row, where the padding rows of a static step write
        self.self_attention = RowKVCache(max_rows * beams + static, max_length)
        self.cross: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # layer -> [rows, heads, frames, head_dim] x2
        self.pending_moves: list[tuple[int, int, int]] = []  # (source row, target row, self-attention length)

    @property
    def scratch_row(self) -> int:
        return self.max_rows * self.beams

    def allocate(self, layers: int, heads: int, head_dim: int, frames: int, dtype: torch.dtype,
                 device: torch.device) -> int:
        """A static cache: every tensor at its full size now, never grown, moved or given back; returns bytes."""
        self.self_attention.allocate(layers, heads, head_dim, dtype, device)
        shape = (self.max_rows, heads, frames, head_dim)
        self.cross = {layer: (torch.zeros(shape, dtype=dtype, device=device),
                              torch.zeros(shape, dtype=dtype, device=device)) for layer in range(layers)}
        tensors = [t for pair in [*self.self_attention.layers.values(), *self.cross.values()] for t in pair]
        return sum(t.numel() * t.element_size() for t in tensors)

    def beam_row(self, row: int, beam: int = 0) -> int:
        """The self-attention row of a window's beam."""
        return row * self.beams + beam

    def reorder_beams(self, row: int, parents: list[int], length: int) -> None:
        """On the step thread: beam b of the window in `row` continues beam parents[b], so it takes that beam's
        first `length` self-attention K/V."""
        moved = [(parent, beam) for beam, parent in enumerate(parents) if parent != beam]
        if moved:
            self.self_attention.copy_rows([self.beam_row(row, parent) for parent, _ in moved],
                                          [self.beam_row(row, beam) for _, beam in moved], length)

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
        """Give all memory back (no window is running), unless it is static."""
        self.pending_moves.clear()
        if not self.static:
            self.self_attention.release()
            self.cross.clear()

    @torch.inference_mode()
    def _move(self, source: int, target: int, length: int) -> None:
        """`length` counts the row's self-attention entries (in each of its beams); its cross-attention K/V move
        whole."""
        self.self_attention.copy_rows([self.beam_row(source, beam) for beam in range(self.beams)],
                                      [self.beam_row(target, beam) for beam in range(self.beams)], length)
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
