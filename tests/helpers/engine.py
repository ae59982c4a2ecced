"""Run the real engine in-process on a given model, for unit tests."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Awaitable, Callable, TypeVar

from torch._dynamo.utils import counters

from batching import Engine, SamplingParams, Sequence
from config import Config
from model_manager import LoadedModel, build_engine

T = TypeVar("T")


def make_engine(model, tokenizer, batch_size: int = 16, max_concurrent: int = 100,
                context_length: int = 1024, batch_invariant: bool = True, torch_compile: bool | str = False,
                **settings) -> Engine:
    """The chat engine as the server builds it (batch-invariant, so outputs can be compared with a request's
    output alone); `settings` are further Config fields. Each test picks its decode path: --torch-compile's default,
    auto (whose path depends on what earlier starts saved), is tested on its own."""
    config = Config(continuous_batching_batch_size=batch_size, max_concurrent=max_concurrent,
                    batch_invariant=batch_invariant, torch_compile=torch_compile, **settings)
    return build_engine(LoadedModel(model, tokenizer, "tiny", context_length), config)


def run_with_engine(engine_factory: Callable[[], Engine], body: Callable[[Engine], Awaitable[T]]) -> T:
    async def main() -> T:
        engine = engine_factory()
        engine.start()
        try:
            return await body(engine)
        finally:
            await engine.stop()
    return asyncio.run(main())


async def finish(engine: Engine, seq: Sequence) -> Sequence:
    async for _ in engine.stream(seq):
        pass
    return seq


async def generate_all(engine: Engine, prompts: list[list[int]], params: SamplingParams) -> list[Sequence]:
    seqs = [engine.add(p, params) for p in prompts]
    return list(await asyncio.gather(*(finish(engine, s) for s in seqs)))


def greedy(max_tokens: int, **kwargs) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, **kwargs)


@dataclass
class WarmUpRecord:
    """What building a compiled engine did: its warm-up progress, its buckets, and dynamo's frame counts once
    it was warm (compare them after serving: any difference is a recompilation)."""
    progress: list[tuple[int, int]] = field(default_factory=list)
    buckets: list[int] = field(default_factory=list)
    frames_when_warm: dict[str, int] = field(default_factory=dict)

    def warmed(self, factory: Callable[[], Engine]) -> Callable[[], Engine]:
        def build() -> Engine:
            engine = factory()
            engine.runner.warm_up(lambda ready, total: self.progress.append((ready, total)))
            self.buckets.extend(engine.runner.static.buckets)
            self.frames_when_warm.update(counters["frames"])
            return engine
        return build

    def assert_complete_and_never_recompiled(self) -> None:
        assert len(self.buckets) > 1
        assert self.progress == [(ready, len(self.buckets)) for ready in range(len(self.buckets) + 1)]
        assert dict(counters["frames"]) == self.frames_when_warm, "a recompilation happened while serving"


def record_rows_leaving_slots(engine: Engine) -> list[Sequence]:
    """A list to which the engine's static cache appends each sequence that outgrows its slot for an extent."""
    arena, left = engine.scheduler.memory, []
    reserve = arena.reserve

    def recording(seq: Sequence, tokens: int) -> bool:
        in_slot = arena.has_slot(seq)
        granted = reserve(seq, tokens)
        if in_slot and not arena.has_slot(seq):
            left.append(seq)
        return granted
    arena.reserve = recording
    return left
