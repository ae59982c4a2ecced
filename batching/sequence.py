"""One generation request as the engine sees it: prompt ids, sampling settings, progress, output queue."""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass, field
from enum import Enum

import torch

from batching.detokenizer import IncrementalDetokenizer, StopStringMatcher


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Delta:
    text: str
    token_ids: list[int]
    finish_reason: str | None = None


_ids = itertools.count()


@dataclass(eq=False)
class Sequence:
    prompt_ids: list[int]
    params: SamplingParams
    detokenizer: IncrementalDetokenizer
    eos_token_ids: frozenset[int]
    request_id: str = ""
    seq_id: int = field(default_factory=lambda: next(_ids))
    output_ids: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    finish_reason: str | None = None
    cancelled: bool = False
    row: int = -1
    generator: torch.Generator | None = None
    outputs: asyncio.Queue[Delta] = field(default_factory=asyncio.Queue)

    def __post_init__(self) -> None:
        self.stops = StopStringMatcher(self.params.stop)

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def last_token(self) -> int:
        return self.output_ids[-1] if self.output_ids else self.prompt_ids[-1]

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    def append_token(self, token_id: int) -> Delta:
        """Record a sampled token and return the text it releases (and the finish reason, if any)."""
        self.output_ids.append(token_id)
        if token_id in self.eos_token_ids:
            return self._finish_after(token_id, self.detokenizer.flush(), "stop")
        text, stopped = self.stops.feed(self.detokenizer.add(token_id))
        if stopped:
            return self._finish(token_id, text, "stop")
        if len(self.output_ids) >= self.params.max_tokens:
            return self._finish_after(token_id, text + self.detokenizer.flush(), "length")
        return Delta(text, [token_id])

    def _finish_after(self, token_id: int, text: str, reason: str) -> Delta:
        """Finish with whatever text is still held back, unless it completes a stop string."""
        tail, stopped = self.stops.feed(text)
        if stopped:
            return self._finish(token_id, tail, "stop")
        return self._finish(token_id, tail + self.stops.flush(), reason)

    def _finish(self, token_id: int, text: str, reason: str) -> Delta:
        self.finish_reason = reason
        self.status = Status.FINISHED
        return Delta(text, [token_id], reason)
