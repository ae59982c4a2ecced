"""Whisper's decoding rules, applied to every row's logits before sampling: suppressed tokens, the first
step's restrictions, and the timestamp grammar (timestamps come in pairs, never go back, and are forced
when together they are likelier than any text token), as OpenAI's decoder and HF's
WhisperTimeStampLogitsProcessor apply them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

NEG_INF = float("-inf")


@dataclass(frozen=True)
class WhisperTokens:
    """The special token ids a Whisper vocabulary defines (timestamps follow <|notimestamps|>)."""
    end_of_text: int
    start_of_transcript: int
    no_timestamps: int
    start_of_previous: int | None = None
    no_speech: int | None = None
    transcribe: int | None = None
    translate: int | None = None
    languages: dict[str, int] = field(default_factory=dict)  # language code -> token id

    @property
    def timestamp_begin(self) -> int:
        return self.no_timestamps + 1


@dataclass(frozen=True)
class RuleSettings:
    suppress: tuple[int, ...] = ()
    max_initial_timestamp_index: int | None = 50  # the first timestamp is at most 1 s (OpenAI's default)


class WhisperLogitRules:
    def __init__(self, tokens: WhisperTokens, settings: RuleSettings) -> None:
        self.tokens = tokens
        self.settings = settings
        self._suppress = torch.tensor(settings.suppress, dtype=torch.long)
        self._language_ids = torch.tensor(sorted(tokens.languages.values()), dtype=torch.long)

    def apply(self, logits: torch.Tensor, generated: Sequence[Sequence[int]],
              detecting_language: Sequence[bool] | None = None) -> torch.Tensor:
        """logits: [rows, vocab] float32, changed in place and returned; generated: each row's tokens after its
        prompt; a row that is detecting the language may only choose a language token."""
        logits[:, self._suppress.to(logits.device)] = NEG_INF
        logits[:, self.tokens.no_timestamps] = NEG_INF
        detecting_language = detecting_language or [False] * len(generated)
        for row, (tokens, detecting) in enumerate(zip(generated, detecting_language)):
            if detecting:
                self._only_languages(logits[row])
            else:
                self._timestamp_grammar(logits[row], tokens)
        self._force_likely_timestamps(logits)
        return logits

    def _timestamp_grammar(self, row: torch.Tensor, tokens: Sequence[int]) -> None:
        begin = self.tokens.timestamp_begin
        if not tokens:
            row[:begin] = NEG_INF  # a window's text starts with a timestamp (this also covers begin-suppressed tokens)
            if self.settings.max_initial_timestamp_index is not None:
                row[begin + self.settings.max_initial_timestamp_index + 1:] = NEG_INF
            return
        last_was_timestamp = tokens[-1] >= begin
        penultimate_was_timestamp = len(tokens) < 2 or tokens[-2] >= begin
        closing_segment = last_was_timestamp and not penultimate_was_timestamp
        if last_was_timestamp:
            if penultimate_was_timestamp:
                row[begin:] = NEG_INF  # a segment's start timestamp is followed by text
            else:
                row[:self.tokens.end_of_text] = NEG_INF  # after an end timestamp: the next start, or the end
        last_timestamp = next((t for t in reversed(tokens) if t >= begin), None)
        if last_timestamp is not None:
            # timestamps never go back; a new segment may start where the last one ended
            row[begin:last_timestamp if closing_segment else last_timestamp + 1] = NEG_INF

    def _force_likely_timestamps(self, logits: torch.Tensor) -> None:
        begin = self.tokens.timestamp_begin
        logprobs = logits.log_softmax(dim=-1)
        timestamp_logprob = logprobs[:, begin:].logsumexp(dim=-1)
        best_text_logprob = logprobs[:, :begin].max(dim=-1).values
        logits[:, :begin].masked_fill_((timestamp_logprob > best_text_logprob).unsqueeze(1), NEG_INF)

    def _only_languages(self, row: torch.Tensor) -> None:
        allowed = torch.full_like(row, NEG_INF)
        ids = self._language_ids.to(row.device)
        allowed[ids] = row[ids]
        row.copy_(allowed)
