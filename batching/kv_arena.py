"""KV memory for the chat engine, fixed at start-up: one arena of `tokens` positions for every layer's keys
and values (the KV budget). Each sequence's K/V fill one contiguous extent of it, sized to the tokens it
holds and grown as it decodes, so attention reads them as a plain view. A finished sequence's extent stays
as a prefix-cache entry until the memory is needed; a new prompt that starts with cached tokens gets a copy
of their K/V instead of computing them.

Bookkeeping runs on the event loop while a step is planned; the tensor copies it implies (prefix reuse,
growth, defragmentation) are queued and carried out, in order, on the step thread before the forward."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from batching.extents import Extent, ExtentAllocator
from batching.prefix_cache import BLOCK_TOKENS, CachedPrefix, PrefixCache
from batching.sequence import Sequence

logger = logging.getLogger("batchwise.kv")

FIRST_DECODE_ROOM = 64  # tokens reserved past the prompt at admission, so short answers never grow


@dataclass(frozen=True)
class KVLayout:
    layers: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @property
    def bytes_per_token(self) -> int:
        return self.layers * 2 * self.kv_heads * self.head_dim * self.dtype.itemsize


def round_up(tokens: int) -> int:
    return -(-tokens // BLOCK_TOKENS) * BLOCK_TOKENS


class KVArena:
    def __init__(self, layout: KVLayout, tokens: int, device: torch.device | str, prefix_caching: bool = True) -> None:
        self.layout = layout
        self.tokens = tokens
        # untouched pages cost nothing on CPU: resident memory follows the tokens actually written
        # head-major, so that a sequence's keys for one head are contiguous, as attention kernels like them
        self.kv = torch.empty((layout.layers, 2, layout.kv_heads, tokens, layout.head_dim), dtype=layout.dtype,
                              device=device)
        self.allocator = ExtentAllocator(tokens)
        self.prefix_cache = PrefixCache() if prefix_caching else None
        self.live: set[Extent] = set()
        self.pending: list[tuple[int, int, int]] = []  # (source, target, tokens) copies, in order

    @property
    def used_tokens(self) -> int:
        return self.tokens - self.allocator.free

    @property
    def cached_tokens(self) -> int:
        return sum(entry.extent.size for entry in self.prefix_cache.entries) if self.prefix_cache else 0

    def admit(self, seq: Sequence) -> bool:
        """Give a waiting sequence its extent, filled with whatever prefix of its tokens is already computed
        (its siblings' prompt, or the prefix cache); False when it does not fit yet."""
        holder, matched = self._reusable(seq)
        protect = holder if isinstance(holder, CachedPrefix) else None
        extent = self._allocate(min(round_up(seq.length + FIRST_DECODE_ROOM), seq.max_length), protect)
        if extent is None:
            return False
        seq.kv = extent
        if matched:
            self.pending.append((self._extent_of(holder).start, extent.start, matched))
            seq.computed = matched
            if seq.prefix_source is None and not seq.output_ids:  # a preempted sequence's own K/V do not count
                seq.cached_tokens = matched
        return True

    def reserve(self, seq: Sequence, tokens: int) -> bool:
        """Make room for the sequence's first `tokens` positions; False when even that is impossible."""
        extent = seq.kv
        if tokens <= extent.size:
            return True
        generous = min(max(round_up(tokens), 2 * extent.size), max(seq.max_length, tokens))
        for size in dict.fromkeys((generous, tokens)):
            if self.allocator.extend(extent, size):
                return True
            moved = self._allocate(size)
            if moved is not None:
                self.pending.append((extent.start, moved.start, seq.computed))
                self._free(extent)
                seq.kv = moved
                return True
        return False

    def record(self, seq: Sequence) -> None:
        """After a step: the sequence's newly computed blocks can serve later prompts."""
        if self.prefix_cache is not None and not seq.params.prompt_logprobs:
            for orphan in self.prefix_cache.register(seq, seq.computed):
                self._free(orphan.extent)

    def release(self, seq: Sequence, keep: bool) -> None:
        """The sequence leaves: its K/V become a prefix-cache entry when `keep` (and caching is on), else free."""
        extent, seq.kv = seq.kv, None
        if extent is None:
            return
        cache = self.prefix_cache
        if keep and cache is not None and seq.computed >= BLOCK_TOKENS and not seq.params.prompt_logprobs:
            self.allocator.shrink(extent, seq.computed)
            entry = CachedPrefix(seq.all_ids[:seq.computed], extent)
            cache.hand_over(seq, entry)
            cache.keep(entry)
            for orphan in cache.register(entry, seq.computed):
                self._free(orphan.extent)
            return
        if cache is not None:
            cache.drop(seq)
        self._free(extent)

    def move_row(self, seq: Sequence, target: int) -> None:
        pass  # a sequence's K/V stay where they are whatever its row

    def idle(self) -> None:
        pass  # the prefix cache keeps what it holds

    def apply_pending(self) -> None:
        """On the step thread: carry out the queued copies in order."""
        try:
            for source, target, tokens in self.pending:
                data = self.kv[:, :, :, source:source + tokens]
                if abs(source - target) < tokens:
                    data = data.clone()
                self.kv[:, :, :, target:target + tokens] = data
        finally:
            self.pending.clear()

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's keys and values, each [kv_heads, tokens, head_dim]."""
        return self.kv[index, 0], self.kv[index, 1]

    def write(self, layer: int, slots: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        """keys/values: [kv_heads, len(slots), head_dim], stored at arena positions `slots`."""
        self.kv[layer, 0][:, slots] = keys
        self.kv[layer, 1][:, slots] = values

    def _reusable(self, seq: Sequence) -> tuple[Sequence | CachedPrefix | None, int]:
        limit = seq.length - 1  # the last token is always computed, so the step has logits to sample from
        if seq.prefix_source is not None:
            return seq.prefix_source, min(seq.prefix_source.computed, limit)
        if self.prefix_cache is None or seq.params.prompt_logprobs:
            return None, 0
        return self.prefix_cache.lookup(seq.all_ids, limit)

    def _allocate(self, size: int, protect: CachedPrefix | None = None) -> Extent | None:
        """An extent of `size`, evicting least recently used cache entries (never `protect`) and defragmenting
        as needed; None when the budget cannot hold it."""
        while True:
            extent = self.allocator.allocate(size)
            if extent is not None:
                self.live.add(extent)
                return extent
            if self.allocator.free >= size:
                self.pending.extend(self.allocator.compact(list(self.live)))
                continue
            victim = next((e for e in self.prefix_cache.entries if e is not protect), None) if self.prefix_cache \
                else None
            if victim is None:
                return None
            self.prefix_cache.drop(victim)
            self._free(victim.extent)

    def _free(self, extent: Extent) -> None:
        self.live.discard(extent)
        self.allocator.release(extent)

    @staticmethod
    def _extent_of(holder: Sequence | CachedPrefix) -> Extent:
        return holder.kv if isinstance(holder, Sequence) else holder.extent
