"""Contiguous ranges of token positions handed out from a fixed pool: first fit, neighbours merged on free.

A sequence's K/V occupy one extent, so attention reads them as a plain view; the pool's size is the KV
budget, so nothing can be allocated beyond it."""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import NamedTuple


@dataclass(eq=False)
class Extent:
    start: int
    size: int

    @property
    def end(self) -> int:
        return self.start + self.size


class ExtentCopy(NamedTuple):
    """What an extent holds, to be copied elsewhere: `size` positions from `source` on, to `target` on."""
    source: int
    target: int
    size: int


class ExtentAllocator:
    def __init__(self, total: int) -> None:
        self.total = total
        self.holes: list[tuple[int, int]] = [(0, total)] if total else []  # (start, size), sorted by start

    @property
    def free(self) -> int:
        return sum(size for _, size in self.holes)

    @property
    def largest_hole(self) -> int:
        return max((size for _, size in self.holes), default=0)

    def allocate(self, size: int) -> Extent | None:
        for index, (start, hole) in enumerate(self.holes):
            if hole >= size:
                self._set_hole(index, start + size, hole - size)
                return Extent(start, size)
        return None

    def extend(self, extent: Extent, size: int) -> bool:
        """Grow the extent in place to `size` when the hole right after it is large enough."""
        index = bisect.bisect_left(self.holes, (extent.end, -1))
        if index == len(self.holes) or self.holes[index][0] != extent.end:
            return size <= extent.size
        start, hole = self.holes[index]
        extra = size - extent.size
        if extra > hole:
            return False
        if extra > 0:
            self._set_hole(index, start + extra, hole - extra)
            extent.size = size
        return True

    def shrink(self, extent: Extent, size: int) -> None:
        if size < extent.size:
            self.release(Extent(extent.start + size, extent.size - size))
            extent.size = size

    def release(self, extent: Extent) -> None:
        if extent.size == 0:
            return
        index = bisect.bisect_left(self.holes, (extent.start, -1))
        start, size = extent.start, extent.size
        if index < len(self.holes) and self.holes[index][0] == extent.end:
            size += self.holes.pop(index)[1]
        if index > 0 and sum(self.holes[index - 1]) == start:
            index -= 1
            start, size = self.holes[index][0], self.holes.pop(index)[1] + size
        self.holes.insert(index, (start, size))

    def compact(self, extents: list[Extent]) -> list[ExtentCopy]:
        """Slide every extent towards the start, leaving one hole at the end; returns the moves in the order they
        must be copied."""
        moves, cursor = [], 0
        for extent in sorted(extents, key=lambda e: e.start):
            if extent.start != cursor:
                moves.append(ExtentCopy(extent.start, cursor, extent.size))
                extent.start = cursor
            cursor += extent.size
        self.holes = [(cursor, self.total - cursor)] if cursor < self.total else []
        return moves

    def _set_hole(self, index: int, start: int, size: int) -> None:
        if size:
            self.holes[index] = (start, size)
        else:
            self.holes.pop(index)
