"""What a starting server is doing, for /health: the stage it is in, with counts where the stage has them
(the decode step's batch sizes compiled so far), so that an operator sees loading progress, not just a 503."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable, TypeVar

from batching import Engine
from batching.torch_thread import on_torch_thread
from config import Config

logger = logging.getLogger("batchwise")
Loaded = TypeVar("Loaded")


@dataclass
class StartupProgress:
    # (stage, done, total), replaced whole: /health reads it on the event loop while the torch thread counts
    state: tuple[str, int | None, int | None] = ("starting", None, None)
    started: float = field(default_factory=time.monotonic)

    def enter(self, stage: str, done: int | None = None, total: int | None = None) -> None:
        if stage != self.state[0]:
            logger.info("start-up: %s", stage)
        self.state = (stage, done, total)

    def counter(self, stage: str) -> Callable[[int, int], None]:
        """A progress callback (done, total) that enters `stage` with its counts at its first call, so the
        stage never shows without them."""
        return lambda done, total: self.enter(stage, done, total)

    def report(self) -> dict[str, str | int | float]:
        stage, done, total = self.state
        counts = {} if total is None else {"done": done, "total": total}
        return {"stage": stage, **counts, "elapsed_s": round(time.monotonic() - self.started, 1)}


async def warm_up(engine: Engine, progress: StartupProgress) -> None:
    """Before serving: compile and run the decode step for every batch size."""
    await on_torch_thread(engine.runner.warm_up, progress.counter("warming up the decode step"))


async def started_engine(config: Config, progress: StartupProgress, load: Callable[[Config], Loaded],
                         build: Callable[[Loaded, Config], Engine]) -> tuple[Loaded, Engine]:
    """The model loaded and its engine built on the torch thread, warmed up and running, each stage shown on
    /health."""
    progress.enter("loading the model")
    loaded = await on_torch_thread(load, config)
    progress.enter("building the engine")
    engine = await on_torch_thread(build, loaded, config.sized_after_loading())  # what the weights left
    await warm_up(engine, progress)
    engine.start()
    return loaded, engine
