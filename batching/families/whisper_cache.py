"""Per-row memory for Whisper decoding: the growing self-attention K/V of each row, and the cross-attention
K/V of the row's audio window, projected from the encoder once when the window is admitted."""

from __future__ import annotations

import torch

from batching.kv_cache import RowKVCache


class WhisperRowCache:
    def __init__(self, max_rows: int, max_length: int) -> None:
        self.max_rows = max_rows
        self.self_attention = RowKVCache(max_rows, max_length)
        self.cross: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # layer -> [rows, heads, frames, head_dim] x2

    def reserve(self, length: int) -> None:
        self.self_attention.reserve(length)

    def release(self) -> None:
        """Give all memory back (called when no sequence is running)."""
        self.self_attention.release()
        self.cross.clear()

    @torch.inference_mode()
    def move_row(self, source: int, target: int, length: int) -> None:
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
