"""Which K/V already computed can serve a new prompt: an index from chained hashes of 16-token blocks to
the holder that computed them (a running sequence, or a finished one kept as a cache entry), and the
cache entries themselves, least recently used first."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Protocol, Sequence

from batching.extents import Extent

BLOCK_TOKENS = 16


class Holder(Protocol):
    """Something whose extent holds the K/V of `kv_tokens[:n]` for every block it registered, computed in its
    `kv_namespace` (a LoRA adapter's load; 0: the base model): the first block's hash starts from it."""
    @property
    def kv_tokens(self) -> Sequence[int]: ...

    @property
    def kv_namespace(self) -> int: ...


@dataclass(eq=False)
class CachedPrefix:
    """A finished sequence's K/V, kept while the memory is not needed elsewhere."""
    kv_tokens: list[int]
    extent: Extent
    kv_namespace: int = 0


def block_hashes(tokens: Sequence[int], blocks: int, start: int = 0, previous: int = 0) -> list[int]:
    """Chained hashes of blocks start..blocks-1: each names its block and every token before it."""
    hashes = []
    for block in range(start, blocks):
        previous = hash((previous, tuple(tokens[block * BLOCK_TOKENS:(block + 1) * BLOCK_TOKENS])))
        hashes.append(previous)
    return hashes


class PrefixCache:
    def __init__(self) -> None:
        self.index: dict[int, Holder] = {}
        self.registered: dict[Holder, list[int]] = {}  # each holder's block hashes, in order
        self.indexed: dict[Holder, int] = {}  # how many of them still point at it
        self.entries: OrderedDict[CachedPrefix, None] = OrderedDict()

    def register(self, holder: Holder, computed: int) -> list[CachedPrefix]:
        """Index the holder's complete blocks among its first `computed` tokens; returns cache entries left
        with no block in the index (another holder now serves all of them), for the caller to free."""
        hashes = self.registered.setdefault(holder, [])
        new = block_hashes(holder.kv_tokens, computed // BLOCK_TOKENS, len(hashes),
                           hashes[-1] if hashes else holder.kv_namespace)
        orphans = []
        for block_hash in new:
            previous = self.index.get(block_hash)
            if previous is holder:
                continue
            self.index[block_hash] = holder
            self.indexed[holder] = self.indexed.get(holder, 0) + 1
            if previous is not None:
                self.indexed[previous] -= 1
                if isinstance(previous, CachedPrefix) and not self.indexed[previous]:
                    orphans.append(previous)
        hashes.extend(new)
        for orphan in orphans:
            self.drop(orphan)
        return orphans

    def lookup(self, tokens: Sequence[int], limit: int, namespace: int = 0) -> tuple[Holder | None, int]:
        """The holder of the longest indexed prefix of `tokens` computed in `namespace` (at most `limit` tokens)
        and its length."""
        best, matched, previous = None, 0, namespace
        for block in range(min(limit, len(tokens)) // BLOCK_TOKENS):
            previous = hash((previous, tuple(tokens[block * BLOCK_TOKENS:(block + 1) * BLOCK_TOKENS])))
            holder = self.index.get(previous)
            if holder is None:
                break
            best, matched = holder, (block + 1) * BLOCK_TOKENS
        if best is None or best.kv_namespace != namespace or list(best.kv_tokens[:matched]) != list(tokens[:matched]):
            return None, 0  # a hash collision: never serve another prompt's K/V
        if isinstance(best, CachedPrefix):
            self.entries.move_to_end(best)
        return best, matched

    def keep(self, entry: CachedPrefix) -> None:
        self.entries[entry] = None

    def least_recent(self) -> CachedPrefix | None:
        return next(iter(self.entries), None)

    def drop(self, holder: Holder) -> None:
        """Forget the holder: its blocks leave the index (unless another holder took them over)."""
        for block_hash in self.registered.pop(holder, []):
            if self.index.get(block_hash) is holder:
                del self.index[block_hash]
        self.indexed.pop(holder, None)
        if isinstance(holder, CachedPrefix):
            self.entries.pop(holder, None)

    def hand_over(self, source: Holder, target: Holder) -> None:
        """The target now holds the source's K/V (same tokens, same extent): its index entries follow."""
        hashes = self.registered.pop(source, [])
        for block_hash in hashes:
            if self.index.get(block_hash) is source:
                self.index[block_hash] = target
        self.registered[target] = hashes
        self.indexed[target] = self.indexed.pop(source, 0)
