"""KV memory owned per batch row: per-layer tensors that running sequences index by their row.

Running sequences occupy rows 0..B-1, so a decode step reads each row's cache as a view: nothing is
concatenated or re-padded per step. ``batching.attention`` writes into it and attends over it.
"""

from __future__ import annotations

import torch


class RowKVCache:
    """Per-layer K/V tensors shaped [rows, kv_heads, capacity, head_dim], allocated on first use
    and grown by doubling (a rare whole copy, never a per-step one)."""

    def __init__(self, max_rows: int, max_length: int, initial_capacity: int = 256) -> None:
        self.max_rows = max_rows
        self.max_length = max_length
        self.initial_capacity = min(initial_capacity, max_length)
        self.capacity = self.initial_capacity
        self.layers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def allocate(self, layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> None:
        """Every layer's tensors at their full length now (a static cache), so they never grow or move."""
        shape = (self.max_rows, kv_heads, self.max_length, head_dim)
        self.layers = {layer: (torch.zeros(shape, dtype=dtype, device=device),
                               torch.zeros(shape, dtype=dtype, device=device)) for layer in range(layers)}
        self.capacity = self.max_length

    @torch.inference_mode()
    def reserve(self, length: int) -> None:
        if length <= self.capacity:
            return
        if length > self.max_length:
            raise ValueError(f"sequence of {length} tokens exceeds the cache's {self.max_length}")
        new_capacity = min(max(length, 2 * self.capacity), self.max_length)
        for index, (keys, values) in self.layers.items():
            self.layers[index] = (self._grow(keys, new_capacity), self._grow(values, new_capacity))
        self.capacity = new_capacity

    def release(self) -> None:
        """Give all memory back (called when no sequence is running)."""
        self.layers.clear()
        self.capacity = self.initial_capacity

    @torch.inference_mode()
    def copy_rows(self, sources: list[int], targets: list[int], length: int) -> None:
        """Row targets[i] takes the first `length` K/V of row sources[i] (as they were before any copy)."""
        for keys, values in self.layers.values():
            source_rows = torch.tensor(sources, device=keys.device)
            target_rows = torch.tensor(targets, device=keys.device)
            keys[target_rows, :, :length] = keys[source_rows, :, :length]
            values[target_rows, :, :length] = values[source_rows, :, :length]

    def store(self, layer: int, rows: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store whole rows from position 0: keys/values are [len(rows), kv_heads, length, head_dim] (room for
        `length` reserved first)."""
        if layer not in self.layers:
            shape = (self.max_rows, keys.shape[1], self.capacity, keys.shape[3])
            # positions past a row's length are never read, so no zero fill is needed
            self.layers[layer] = (keys.new_empty(shape), values.new_empty(shape))
        cached_keys, cached_values = self.layers[layer]
        cached_keys[rows, :, :keys.shape[2]] = keys
        cached_values[rows, :, :values.shape[2]] = values

    def write(self, layer: int, rows: torch.Tensor, positions: torch.Tensor,
              keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store one token per (row, position); keys/values are [tokens, kv_heads, head_dim]."""
        if layer not in self.layers:
            shape = (self.max_rows, keys.shape[1], self.capacity, keys.shape[2])
            self.layers[layer] = (keys.new_zeros(shape), values.new_zeros(shape))
        cached_keys, cached_values = self.layers[layer]
        cached_keys[rows, :, positions] = keys
        cached_values[rows, :, positions] = values
        return cached_keys, cached_values

    @staticmethod
    def _grow(tensor: torch.Tensor, capacity: int) -> torch.Tensor:
        grown = tensor.new_zeros((*tensor.shape[:2], capacity, tensor.shape[3]))
        grown[:, :, :tensor.shape[2]] = tensor
        return grown
