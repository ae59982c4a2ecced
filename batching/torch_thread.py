"""The one thread of the process that runs torch. Each thread that runs torch ops gets its own OpenMP pool,
and once two pools have run on the same cores, every later forward runs about twice as slowly (measured on a
2-core CPU: SmolLM2-135M's one-row decode step took 12 ms with loading and steps on one thread, 28-32 ms on
either thread once the other had run a forward too). So loading the model, building the engine, warming it
up, every engine step and the serving side's torch work (image processors, audio features, word timing) all
run here, one at a time."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any, Callable, TypeVar

T = TypeVar("T")

THREAD_NAME = "batchwise-torch"

_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=THREAD_NAME)


async def on_torch_thread(function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    return await asyncio.get_running_loop().run_in_executor(_executor, partial(function, *args, **kwargs))
