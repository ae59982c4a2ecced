"""What a starting server is doing, for /health: the stage it is in, with counts where the stage has them
(the decode step's batch sizes compiled so far), so that an operator sees loading progress, not just a 503."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

logger = logging.getLogger("batchwise")


@dataclass
class StartupProgress:
    stage: str = "starting"
    done: int | None = None
    total: int | None = None
    started: float = field(default_factory=time.monotonic)

    def enter(self, stage: str) -> None:
        self.stage, self.done, self.total = stage, None, None
        logger.info("start-up: %s", stage)

    def count(self, done: int, total: int) -> None:
        self.done, self.total = done, total

    def report(self) -> dict[str, str | int | float]:
        counts = {} if self.total is None else {"done": self.done, "total": self.total}
        return {"stage": self.stage, **counts, "elapsed_s": round(time.monotonic() - self.started, 1)}
