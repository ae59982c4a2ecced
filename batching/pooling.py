"""Embeddings from an embedding model (BERT-family encoders, or decoders trained to embed): each request's input is
a prompt computed whole in one step, up to a batch of them in one padded forward, whose last hidden states are
pooled per sequence (sentence-transformers' modes) and normalised where the model's configuration says so; or a
cross-encoder's relevance score of a query-document pair (its classifier's one logit, through a sigmoid unless
the model says otherwise). Nothing is kept after the step and nothing is sampled; the engine loop, its bounded
queue, cancellation and fault isolation are the decoder's (batching.engine, batching.scheduler)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from batching.scheduler import Span
from batching.sequence import Pooled, Sequence

POOLING_MODES = ("cls", "mean", "max", "lasttoken")  # sentence-transformers' names
SCORE = "score"  # a cross-encoder's: its classifier's logit


@dataclass(frozen=True)
class Pooling:
    mode: str  # one of POOLING_MODES, or SCORE
    normalize: bool  # to unit length (sentence-transformers' Normalize module); a score: through a sigmoid


@dataclass(frozen=True)
class TokenTypes:
    """A query-document pair's segment ids (BERT's token_type_ids), for a cross-encoder."""
    ids: list[int]


def pool(hidden: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """[rows, tokens, dim] hidden states of right-padded rows ([rows, tokens] mask of ones, then zeros) ->
    [rows, dim] in float32: the first token's, the mean or maximum over the row's tokens, or its last token's."""
    hidden = hidden.float()
    if mode == "cls":
        return hidden[:, 0]
    if mode == "lasttoken":
        return hidden[torch.arange(len(hidden), device=hidden.device), mask.sum(dim=1) - 1]
    if mode == "max":
        return hidden.masked_fill(mask[..., None] == 0, float("-inf")).max(dim=1).values
    weights = mask[..., None].float()
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)


class PromptsOnly:
    """The scheduler's KV memory for an engine that keeps none: each sequence is computed whole in one step, within
    the model's longest input."""

    def __init__(self, sequence_capacity: int) -> None:
        self.sequence_capacity = sequence_capacity

    def admit(self, seq: Sequence) -> bool:
        return True

    def reserve(self, seq: Sequence, tokens: int) -> bool:
        return True

    def record(self, seq: Sequence) -> None:
        pass

    def release(self, seq: Sequence, keep: bool) -> None:
        pass

    def move_row(self, seq: Sequence, target: int) -> None:
        pass

    def apply_pending(self) -> None:
        pass

    def idle(self) -> None:
        pass


class PoolingRunner:
    """One padded forward of the step's prompts through the model without its head (transformers' AutoModel, its
    own attention), then each row pooled."""

    def __init__(self, model: PreTrainedModel, pooling: Pooling) -> None:
        self.model = model
        self.pooling = pooling
        self.device = model.device

    @torch.inference_mode()
    def step(self, spans: list[Span]) -> list[list[Pooled]]:
        seqs = [span.seq for span in spans]
        inputs = {"input_ids": self._padded([seq.prompt_ids for seq in seqs]),
                  "attention_mask": self._padded([[1] * len(seq.prompt_ids) for seq in seqs])}
        if any(isinstance(seq.inputs, TokenTypes) for seq in seqs):
            inputs["token_type_ids"] = self._padded([seq.inputs.ids if isinstance(seq.inputs, TokenTypes) else []
                                                     for seq in seqs], inputs["input_ids"].shape[1])
        output = self.model(**inputs)
        if self.pooling.mode == SCORE:
            vectors = output.logits.float()
            vectors = torch.sigmoid(vectors) if self.pooling.normalize else vectors
        else:
            vectors = pool(output.last_hidden_state, inputs["attention_mask"], self.pooling.mode)
            vectors = F.normalize(vectors, dim=-1) if self.pooling.normalize else vectors
        return [[Pooled(vector)] for vector in vectors.cpu().numpy()]

    def _padded(self, rows: list[list[int]], length: int = 0) -> torch.Tensor:
        """Right-padded with zeros to the longest row (or `length`)."""
        longest = max(length, *map(len, rows))
        return torch.tensor([row + [0] * (longest - len(row)) for row in rows], device=self.device)

    def warm_up(self, on_ready: Callable[[int, int], None]) -> None:
        """Nothing is compiled ahead of serving."""
