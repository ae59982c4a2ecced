"""KV memory for the chat engine, fixed at start-up: one arena of `tokens` positions for every layer's keys
and values (the KV budget). Each sequence's K/V fill one contiguous extent of it, sized to the tokens it
holds and grown as it decodes, so attention reads them as a plain view. A finished sequence's extent stays
as a prefix-cache entry until the memory is needed; a new prompt that starts with cached tokens gets a copy
of their K/V instead of computing them.

With a static cache (`slots`), the arena starts with one fixed extent per batch row, all of one length, so
the running rows' K/V form one [rows, kv_heads, length, head_dim] view that a decode step of static shape
attends over; the rest of the budget holds prefix-cache entries, and the extents of long rows: a sequence whose first
extent would not fit a slot, or that outgrows its slot, still holds its batch row, but its K/V lie in an extent of
their own, grown and moved as without slots, so the slot length is a tuning knob rather than a limit on requests.

Bookkeeping runs on the event loop while a step is planned; the tensor copies it implies (prefix reuse,
growth, defragmentation) are queued and carried out, in order, on the torch thread before the forward."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from batching.extents import Extent, ExtentAllocator, ExtentCopy
from batching.prefix_cache import BLOCK_TOKENS, CachedPrefix, PrefixCache
from batching.sequence import Sequence

logger = logging.getLogger("batchwise.kv")

FIRST_DECODE_ROOM = 64  # tokens reserved past the prompt at admission, so short answers never grow
SCRATCH_TOKENS = 8  # where padding tokens write their K/V


@dataclass(frozen=True)
class KVLayout:
    """The K/V every layer stores per token, and the device each layer's K/V live on (its own layer's, when the
    model is spread over several devices)."""
    kv_heads: int
    head_dim: int
    dtype: torch.dtype
    devices: tuple[torch.device, ...]

    @property
    def layers(self) -> int:
        return len(self.devices)

    @property
    def bytes_per_token(self) -> int:
        return self.layers * 2 * self.kv_heads * self.head_dim * self.dtype.itemsize


def round_up(tokens: int) -> int:
    return -(-tokens // BLOCK_TOKENS) * BLOCK_TOKENS


@dataclass(frozen=True)
class Slots:
    """The static cache: `rows` fixed extents of `length` positions, then one more that padding rows write to."""
    rows: int
    length: int

    @property
    def tokens(self) -> int:
        return (self.rows + 1) * self.length

    def extent(self, row: int) -> Extent:
        return Extent(row * self.length, self.length)


class KVArena:
    def __init__(self, layout: KVLayout, tokens: int, prefix_caching: bool = True, slots: Slots | None = None) -> None:
        if slots is not None and slots.tokens > tokens:
            raise ValueError(f"the static cache needs {slots.tokens} token positions ({slots.rows} rows of "
                             f"{slots.length}, plus one for padding), more than the KV budget's {tokens}")
        self.layout = layout
        self.tokens = tokens
        self.slots = slots
        # one tensor per layer, so a compiled step updates each in place; head-major, so that a sequence's keys
        # for one head are contiguous, as attention kernels like them; untouched pages cost nothing on CPU
        shape = (layout.kv_heads, tokens, layout.head_dim)
        self.keys = [torch.empty(shape, dtype=layout.dtype, device=device) for device in layout.devices]
        self.values = [torch.empty(shape, dtype=layout.dtype, device=device) for device in layout.devices]
        self.allocator = ExtentAllocator(tokens)
        self.prefix_cache = PrefixCache() if prefix_caching else None
        self.live: set[Extent] = set()
        self.pending: list[ExtentCopy] = []  # K/V copies, in order
        if slots is not None:  # a static step reads whole slots, masked: unwritten positions must not hold NaNs
            for tensor in (*self.keys, *self.values):
                tensor[:, :slots.tokens].zero_()
        self.rows_used = 0  # running rows: a new row's index, and so its slot
        self.rows_in_slots = 0
        # the slots (the rest holds cache entries), or a few positions where padding tokens write
        self.reserved = self.allocator.allocate(slots.tokens if slots else SCRATCH_TOKENS)
        self.live.add(self.reserved)
        self.scratch = slots.extent(slots.rows) if slots else self.reserved

    @property
    def sequence_capacity(self) -> int:
        """The most tokens one sequence can hold: a long row's extent beside the slots, or the slot, if longer."""
        return max(self.slots.length, self.tokens - self.slots.tokens) if self.slots else self.tokens - SCRATCH_TOKENS

    @property
    def used_tokens(self) -> int:
        """Positions that hold K/V of running sequences or cache entries."""
        held = self.tokens - self.allocator.free - self.reserved.size
        return held + (self.rows_in_slots * self.slots.length if self.slots else 0)

    @property
    def cached_tokens(self) -> int:
        return sum(entry.extent.size for entry in self.prefix_cache.entries) if self.prefix_cache else 0

    def has_slot(self, seq: Sequence) -> bool:
        """Whether the running sequence's K/V lie in its row's slot (else it is a long row, or there are no slots)."""
        return self._in_slots(seq.kv)

    def admit(self, seq: Sequence) -> bool:
        """Give a waiting sequence its extent, filled with whatever prefix of its tokens is already computed
        (its siblings' prompt, or the prefix cache); False when it does not fit yet."""
        holder, matched = self._reusable(seq)
        if self.slots is not None and self.rows_used == self.slots.rows:
            return False
        size = min(round_up(seq.length + FIRST_DECODE_ROOM), seq.max_length)
        if self.slots is not None and size <= self.slots.length:
            extent = self.slots.extent(self.rows_used)
            self.rows_in_slots += 1
        else:
            extent = self._allocate(size, holder if isinstance(holder, CachedPrefix) else None)
        if extent is None:
            return False
        self.rows_used += 1
        seq.kv = extent
        if matched:
            self.pending.append(ExtentCopy(self._extent_of(holder).start, extent.start, matched))
            seq.computed = matched
            if seq.prefix_source is None and not seq.output_ids:  # a preempted sequence's own K/V do not count
                seq.cached_tokens = matched
        return True

    def reserve(self, seq: Sequence, tokens: int) -> bool:
        """Make room for the sequence's first `tokens` positions, a row outgrowing its slot leaving it for an extent
        of its own; False when even that is impossible."""
        extent = seq.kv
        if tokens <= extent.size:
            return True
        generous = min(max(round_up(tokens), 2 * extent.size), max(seq.max_length, tokens))
        for size in dict.fromkeys((generous, tokens)):
            if not self._in_slots(extent) and self.allocator.extend(extent, size):
                return True
            moved = self._allocate(size)
            if moved is not None:
                self.pending.append(ExtentCopy(extent.start, moved.start, seq.computed))
                self._vacate(extent)
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
        self.rows_used -= 1
        cache = self.prefix_cache
        if keep and cache is not None and seq.computed >= BLOCK_TOKENS and not seq.params.prompt_logprobs:
            entry_extent = self._keep_extent(extent, seq.computed)
            if entry_extent is not None:
                entry = CachedPrefix(seq.kv_tokens[:seq.computed], entry_extent, seq.kv_namespace)
                cache.hand_over(seq, entry)
                cache.keep(entry)
                for orphan in cache.register(entry, seq.computed):
                    self._free(orphan.extent)
                if entry_extent is not extent:  # copied out of its slot
                    self._vacate(extent)
                return
        if cache is not None:
            cache.drop(seq)
        self._vacate(extent)

    def _keep_extent(self, extent: Extent, tokens: int) -> Extent | None:
        """Where a leaving sequence's first `tokens` positions stay cached: its own extent, trimmed; a copy out
        of its slot (None when there is no room)."""
        if not self._in_slots(extent):
            self.allocator.shrink(extent, tokens)
            return extent
        kept = self._allocate(tokens)
        if kept is not None:
            self.pending.append(ExtentCopy(extent.start, kept.start, tokens))
        return kept

    def _in_slots(self, extent: Extent) -> bool:
        return self.slots is not None and extent.start < self.slots.tokens

    def _vacate(self, extent: Extent) -> None:
        """A sequence leaves the extent: a slot stays its row's, unused; any other is freed."""
        if self._in_slots(extent):
            self.rows_in_slots -= 1
        else:
            self._free(extent)

    def move_row(self, seq: Sequence, target: int) -> None:
        """A row's K/V in a slot move to its new row's slot; others stay where they are."""
        if self.has_slot(seq):
            slot = self.slots.extent(target)
            self.pending.append(ExtentCopy(seq.kv.start, slot.start, seq.computed))
            seq.kv = slot

    def idle(self) -> None:
        pass  # the prefix cache keeps what it holds

    def apply_pending(self) -> None:
        """On the torch thread: carry out the queued copies in order."""
        try:
            for source, target, size in self.pending:
                for tensor in (*self.keys, *self.values):
                    data = tensor[:, source:source + size]
                    tensor[:, target:target + size] = data.clone() if abs(source - target) < size else data
        finally:
            self.pending.clear()

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's keys and values, each [kv_heads, tokens, head_dim]."""
        return self.keys[index], self.values[index]

    def write(self, layer: int, positions: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        """keys/values: [kv_heads, len(positions), head_dim], stored at arena positions `positions`."""
        positions = positions.to(self.keys[layer].device)  # no copy unless the model spans devices
        self.keys[layer][:, positions] = keys
        self.values[layer][:, positions] = values

    def _reusable(self, seq: Sequence) -> tuple[Sequence | CachedPrefix | None, int]:
        limit = seq.length - 1  # the last token is always computed, so the step has logits to sample from
        if seq.prefix_source is not None:
            return seq.prefix_source, min(seq.prefix_source.computed, limit)
        if self.prefix_cache is None or seq.params.prompt_logprobs:
            return None, 0
        return self.prefix_cache.lookup(seq.kv_tokens, limit, seq.kv_namespace)

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
