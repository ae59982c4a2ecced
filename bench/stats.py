"""One measured configuration (server level or baseline) and the numbers the report needs from it."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any


def percentile(values: list[float], fraction: float) -> float:
    """Linear interpolation between closest ranks (numpy's default); NaN when there is nothing to rank."""
    if not values:
        return math.nan
    ordered = sorted(values)
    position = fraction * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


@dataclass
class Measurement:
    configuration: str
    requests: int
    completion_tokens: int
    wall_s: float
    ttfts_s: list[float] = field(default_factory=list)
    latencies_s: list[float] = field(default_factory=list)
    failed: int = 0
    requested_tokens_each: int = 0
    concurrency: int = 0  # requests kept in flight; 0 for the in-process baselines

    @property
    def tokens_per_s(self) -> float:
        return self.completion_tokens / self.wall_s if self.wall_s > 0 else math.nan

    @property
    def mean_completion_tokens(self) -> float:
        succeeded = self.requests - self.failed
        return self.completion_tokens / succeeded if succeeded else math.nan

    def ttft(self, fraction: float) -> float:
        return percentile(self.ttfts_s, fraction)

    def latency(self, fraction: float) -> float:
        return percentile(self.latencies_s, fraction)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Measurement:
        return cls(**data)
