"""Failpoints for chaos tests, operators' and ours (as etcd's gofail or TiKV's fail-rs): BATCHWISE_FAILPOINTS
is a comma-separated list of STAGE:USER:KIND. Whenever a step of STAGE (prefill or decode) includes a row of
a request whose OpenAI `user` field is USER, the step does KIND instead of running: `error` raises a
RuntimeError, `oom` raises torch.OutOfMemoryError, `hang` blocks until the engine stops."""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from batching.scheduler import Span

STAGES = ("prefill", "decode")
KINDS = ("error", "oom", "hang")


@dataclass(frozen=True)
class Failpoint:
    stage: str
    user: str
    kind: str

    def __str__(self) -> str:
        return f"{self.stage}:{self.user}:{self.kind}"


def parse_failpoints(text: str) -> list[Failpoint]:
    """Raises ValueError naming the entry that is not STAGE:USER:KIND."""
    points = []
    for entry in filter(None, (part.strip() for part in text.split(","))):
        parts = entry.split(":")
        if len(parts) != 3 or parts[0] not in STAGES or not parts[1] or parts[2] not in KINDS:
            raise ValueError(f"failpoint {entry!r} is not STAGE:USER:KIND with STAGE one of {', '.join(STAGES)} "
                             f"and KIND one of {', '.join(KINDS)}")
        points.append(Failpoint(*parts))
    return points


class Failpoints:
    def __init__(self, points: list[Failpoint]) -> None:
        self.points = {(point.stage, point.user): point for point in points}
        self._released = threading.Event()

    def release(self) -> None:
        """End the hangs (when the engine stops), so that the process can exit normally."""
        self._released.set()

    def trigger(self, spans: list[Span]) -> None:
        """On the torch thread, before the step runs: fail it as the first matching failpoint says."""
        for span in spans:
            point = self.points.get(("decode" if span.seq.decoding else "prefill", span.seq.user))
            if point is None:
                continue
            if point.kind == "hang":
                self._released.wait()
            error = torch.OutOfMemoryError if point.kind == "oom" else RuntimeError
            raise error(f"failpoint {point}")
