"""The continuous-batching engine. Nothing here knows about HTTP."""

from batching.attention import ATTENTION_NAME
from batching.engine import Engine, EngineError, EngineStats
from batching.kv_cache import RowKVCache
from batching.runner import ModelRunner
from batching.scheduler import QueueFullError, Scheduler
from batching.sequence import Delta, SamplingParams, Sequence, TokenLogprob

__all__ = [
    "ATTENTION_NAME", "Delta", "Engine", "EngineError", "EngineStats", "ModelRunner", "QueueFullError",
    "RowKVCache", "SamplingParams", "Scheduler", "Sequence", "TokenLogprob",
]
