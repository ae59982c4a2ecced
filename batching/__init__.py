"""The continuous-batching engine. Nothing here knows about HTTP."""

from batching.attention import ATTENTION_NAME, kv_layout
from batching.engine import Engine, EngineError, EngineStats
from batching.kv_arena import KVArena, KVLayout, Slots
from batching.profiler import StepProfiler
from batching.runner import ModelRunner
from batching.scheduler import QueueFullError, Scheduler
from batching.sequence import Delta, Grammar, SamplingParams, Sequence, TokenConstraint, TokenLogprob
from batching.static_decode import StaticDecoder

__all__ = [
    "ATTENTION_NAME", "Delta", "Engine", "EngineError", "EngineStats", "Grammar", "KVArena", "KVLayout", "ModelRunner",
    "QueueFullError", "SamplingParams", "Scheduler", "Sequence", "Slots", "StaticDecoder", "StepProfiler",
    "TokenConstraint", "TokenLogprob", "kv_layout",
]
