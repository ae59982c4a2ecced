"""One generation request as the engine sees it: prompt ids, sampling settings, progress, output queue."""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Protocol, TypeAlias

import numpy as np
import torch

from batching.detokenizer import IncrementalDetokenizer, StopStringMatcher
from batching.extents import Extent
from batching.lora import NO_ADAPTER

if TYPE_CHECKING:  # the modules of the input kinds import this one
    from batching.families.encoder_decoder import TextInput
    from batching.families.whisper_runner import SpeechWindow, WindowDecoding, WindowResult
    from batching.lora_adapters import LoraAdapter
    from batching.pooling import TokenTypes
    from batching.vision import ImageInputs

# what a sequence carries beyond its token ids, for its runner: nothing for plain text
SequenceInputs: TypeAlias = "ImageInputs | TextInput | SpeechWindow | TokenTypes | None"


class TokenConstraint(Protocol):
    """One sequence's place in a grammar its tokens must follow (structured output, forced tool calls)."""

    def write_mask(self, address: int, size: int) -> None:
        """Write the allowed next tokens as a bitmask (token t is bit t % 32 of int32 word t // 32)."""

    def accept(self, token_id: int) -> bool:
        """Advance past a sampled token; False if the grammar forbids it."""

    @property
    def complete(self) -> bool:
        """No further token can follow: the output is whole."""


class Grammar(Protocol):
    def constraint(self) -> TokenConstraint:
        """A fresh constraint at the grammar's start, for one sequence."""


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: bool = False
    grammar: Grammar | None = None
    shown_special_tokens: tuple[tuple[int, str], ...] = ()  # special tokens its text keeps (id, text)
    speculative: bool = True  # whether it may verify drafts where the engine drafts
    pooled: bool = False  # the prompt's embedding comes back (Pooled) and nothing is sampled: embeddings

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalised(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0
                    or self.logit_bias or self.min_tokens)


@dataclass(frozen=True)
class Pooled:
    """What a pooled sequence's step emits in place of a token: its prompt's embedding, float32."""
    vector: np.ndarray


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Delta:
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)
    error: str = ""  # why, when finish_reason is "error"
    window: WindowResult | None = None  # a speech window's: its no-speech probability, and at its end what it decoded
    embedding: np.ndarray | None = None  # a pooled sequence's, on its only delta


_ids = itertools.count()


@dataclass(eq=False)
class Sequence:
    prompt_ids: list[int]
    params: SamplingParams
    detokenizer: IncrementalDetokenizer
    eos_token_ids: frozenset[int]
    request_id: str = ""
    user: str = ""  # the request's OpenAI `user` field (failpoints match it)
    seq_id: int = field(default_factory=lambda: next(_ids))
    output_ids: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    finish_reason: str | None = None
    cancelled: bool = False
    row: int = -1
    kv: Extent | None = None  # where its K/V live (chat engine)
    computed: int = 0  # leading tokens whose K/V are in memory
    cached_tokens: int = 0  # of those, how many came from the prefix cache
    generator: torch.Generator | None = None
    inputs: SequenceInputs = None
    adapter: LoraAdapter | None = None  # the LoRA adapter its forwards add to the base model
    window_decoding: WindowDecoding | None = None  # a speech window's, kept by Whisper's runner; its deltas report it
    prefix_source: Sequence | None = None  # a sibling admitted with it whose prefill (and KV) it shares
    cumulative_logprob: float = 0.0
    prompt_logprobs: list[TokenLogprob | None] = field(default_factory=list)
    outputs: asyncio.Queue[Delta] = field(default_factory=asyncio.Queue)

    def __post_init__(self) -> None:
        self.all_ids = [*self.prompt_ids, *self.output_ids]  # the tokens whose K/V it holds or will hold
        self.stops = StopStringMatcher(self.params.stop)
        self.stop_token_ids = frozenset(self.params.stop_token_ids) | (
            frozenset() if self.params.ignore_eos else self.eos_token_ids)
        self.constraint = self.params.grammar.constraint() if self.params.grammar else None

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def decoding(self) -> bool:
        """Its prompt is computed and it has sampled tokens: each step computes one more."""
        return bool(self.output_ids) and self.computed == self.length - 1

    @property
    def max_length(self) -> int:
        return len(self.prompt_ids) + self.params.max_tokens

    @property
    def kv_tokens(self) -> list[int]:
        """What its K/V depend on, for the prefix cache: its tokens, with image placeholders marked by the images."""
        kv_prompt = getattr(self.inputs, "kv_prompt", None)
        return [*kv_prompt, *self.output_ids] if kv_prompt is not None else self.all_ids

    @property
    def kv_namespace(self) -> int:
        """What its K/V depend on besides its tokens, for the prefix cache: its LoRA adapter's load, or 0 for none."""
        return self.adapter.key if self.adapter else 0

    @property
    def adapter_slot(self) -> int:
        return self.adapter.slot if self.adapter else NO_ADAPTER

    @property
    def last_token(self) -> int:
        return self.output_ids[-1] if self.output_ids else self.prompt_ids[-1]

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    @property
    def banned_token_ids(self) -> frozenset[int]:
        """Tokens that would end the sequence before min_tokens."""
        if len(self.output_ids) >= self.params.min_tokens:
            return frozenset()
        return frozenset(self.params.stop_token_ids) | self.eos_token_ids

    def append_token(self, sampled: TokenLogprob) -> Delta:
        """Record a sampled token and return the text it releases (and the finish reason, if any)."""
        token_id = sampled.token_id
        self.output_ids.append(token_id)
        self.all_ids.append(token_id)
        self.cumulative_logprob += sampled.logprob
        logprobs = [sampled] if self.params.logprobs is not None else []
        if token_id in self.stop_token_ids:
            return self._finish_after(self.detokenizer.flush(), "stop", logprobs)
        if self.constraint and not self.constraint.accept(token_id):
            raise ValueError(f"token {token_id} breaks the request's grammar")
        text, stopped = self.stops.feed(self.detokenizer.add(token_id))
        if stopped:
            return self._finish(text, "stop", logprobs)
        if self.constraint and self.constraint.complete:
            return self._finish_after(text + self.detokenizer.flush(), "stop", logprobs)
        if len(self.output_ids) >= self.params.max_tokens:
            return self._finish_after(text + self.detokenizer.flush(), "length", logprobs)
        return self._delta(text, None, logprobs)

    def finish_pooled(self, pooled: Pooled) -> Delta:
        """A pooled sequence ends with its embedding, its only output."""
        self.finish_reason = "stop"
        self.status = Status.FINISHED
        return Delta("", [], "stop", embedding=pooled.vector)

    def _finish_after(self, text: str, reason: str, logprobs: list[TokenLogprob]) -> Delta:
        """Finish with whatever text is still held back, unless it completes a stop string."""
        tail, stopped = self.stops.feed(text)
        if stopped:
            return self._finish(tail, "stop", logprobs)
        return self._finish(tail + self.stops.flush(), reason, logprobs)

    def _finish(self, text: str, reason: str, logprobs: list[TokenLogprob]) -> Delta:
        self.finish_reason = reason
        self.status = Status.FINISHED
        return self._delta(text, reason, logprobs)

    def _delta(self, text: str, reason: str | None, logprobs: list[TokenLogprob]) -> Delta:
        window = self.window_decoding.result(self) if self.window_decoding else None
        return Delta(text, [self.output_ids[-1]], reason, logprobs, window=window)
