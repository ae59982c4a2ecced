"""Speculative decoding: a decoding row proposes the tokens after its last one, by prompt lookup (n-gram drafts:
where its last tokens occurred earlier in its prompt or output, the tokens that followed them there) or from a
draft model (batching.draft_model); one forward computes the target model's logits at its last token and at each
draft token, and the drafts the target would have chosen itself are kept.

Verification keeps each row's output distribution exactly: greedy rows keep drafts while they equal the target's
argmax and then take the target's token; sampled rows (the drafts being deterministic) accept draft x with
probability p(x) under the row's processed distribution and, on rejection, draw from p with x removed. Every
emitted token's log-probability comes from its own position's logits, as without drafts."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from batching.sampler import apply_penalties, filter_candidates, token_logprobs
from batching.sequence import Sequence, TokenLogprob
from kernels.logits import argmax_logsumexp

if TYPE_CHECKING:
    from batching.scheduler import Span


@dataclass(frozen=True)
class SpeculativeSettings:
    """vLLM's --speculative-config, and when drafting pays."""
    tokens: int  # num_speculative_tokens: the most draft tokens a row verifies per step
    lookup_min: int  # ngram: prompt_lookup_min, the shortest n-gram matched
    lookup_max: int  # ngram: prompt_lookup_max, the longest n-gram matched (tried first)
    max_sequences: int  # with more sequences in the engine, no drafts: verifying costs compute a busy batch lacks
    draft_model: Any = field(default=None, compare=False)  # a causal LM with the target's tokenizer; None: n-grams


class Drafter(Protocol):
    def draft(self, spans: list[Span]) -> None:
        """Fill in the draft of each span the scheduler gave room for one (span.draft_room tokens at most); on the
        torch thread, before the step's forward."""


class NgramDrafter:
    def __init__(self, settings: SpeculativeSettings) -> None:
        self.settings = settings

    def draft(self, spans: list[Span]) -> None:
        for span in spans:
            if span.draft_room:
                span.draft = propose(span.seq.all_ids, self.settings, span.draft_room)


@dataclass
class DraftStats:
    """What speculation did, for metrics: draft tokens proposed, those the target accepted, rows verified."""
    proposed: int = 0
    accepted: int = 0
    verifications: int = 0

    def count(self, draft: tuple[int, ...], emitted: int) -> None:
        self.proposed += len(draft)
        self.accepted += emitted - 1
        self.verifications += 1


def drafts_allowed(seq: Sequence) -> bool:
    """Whether a row may verify a draft: not when its request opted out; not where its next token depends on state
    the sampler updates token by token (repetition, presence and frequency penalties; min_tokens' ban on ending; a
    grammar), nor with images (their rotary positions are the prompt's own)."""
    params = seq.params
    return params.speculative and not (
        params.repetition_penalty != 1.0 or params.presence_penalty or params.frequency_penalty
        or seq.banned_token_ids or seq.constraint is not None or seq.inputs is not None)


def propose(tokens: list[int], settings: SpeculativeSettings, limit: int) -> tuple[int, ...]:
    """Up to `limit` tokens that followed the most recent earlier occurrence of the last n tokens, for the longest
    n from lookup_max down to lookup_min that occurred before; () when none did."""
    if limit < 1:
        return ()
    ids = np.asarray(tokens)
    for n in range(min(settings.lookup_max, len(ids) - 1), settings.lookup_min - 1, -1):
        # windows that start early enough to be followed by a token: never the last n tokens themselves
        windows = np.lib.stride_tricks.sliding_window_view(ids[:-1], n)
        matches = np.flatnonzero((windows == ids[-n:]).all(axis=1))
        if len(matches):
            follow = matches[-1] + n
            return tuple(ids[follow:follow + limit].tolist())
    return ()


def verify(logits: torch.Tensor, seq: Sequence, draft: tuple[int, ...]) -> list[TokenLogprob]:
    """The tokens a row emits: the draft tokens the target accepts, then its own next token (a correction, or the
    bonus token after the whole draft). logits: [1 + len(draft), vocab] float32, at the row's last token and at each
    draft token."""
    greedy_tokens, logsumexp = argmax_logsumexp(logits)
    rows = [seq] * len(logits)
    shaped = apply_penalties(logits, rows) if seq.params.logit_bias else logits  # the one stateless adjustment
    if shaped is not logits:
        greedy_tokens = argmax_logsumexp(shaped, with_logsumexp=False)[0]
    if seq.params.greedy:
        tokens = accepted_greedy(greedy_tokens.tolist(), draft)
    else:
        tokens = accepted_sampled(filter_candidates(shaped / seq.params.temperature, rows).softmax(dim=-1), seq, draft)
    count = len(tokens)
    return token_logprobs(logits[:count], tokens, [seq.params.logprobs or 0] * count, logsumexp[:count])


def accepted_greedy(targets: list[int], draft: tuple[int, ...]) -> list[int]:
    """The draft while it equals the target's choices, then the target's choice after it."""
    accepted = next((index for index, (token, target) in enumerate(zip(draft, targets)) if token != target),
                    len(draft))
    return targets[:accepted + 1]


def accepted_sampled(probs: torch.Tensor, seq: Sequence, draft: tuple[int, ...]) -> list[int]:
    """Rejection sampling against a one-hot draft: draft token x at position i is kept with probability p_i(x); at
    the first rejection the token is drawn from p_i without x (the normalised excess of p over the draft), after
    the whole draft from p at the next position. Each token is thus distributed exactly as p."""
    length = len(draft)
    drafted = probs[torch.arange(length, device=probs.device), torch.tensor(draft, device=probs.device)]
    uniform = torch.rand(length, generator=seq.generator, device=probs.device)
    accepted = int((uniform < drafted).int().cumprod(dim=0).sum())
    last = probs[accepted]
    if accepted < length:
        last = last.clone()
        last[draft[accepted]] = 0.0
    noise = torch.empty_like(last).exponential_(generator=seq.generator)
    # argmax(p / E) with E ~ Exp(1) draws from p, normalised or not (the exponential race, as the sampler draws)
    return [*draft[:accepted], int((last / noise).argmax())]
