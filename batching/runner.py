"""Model forwards for one engine step: every sequence's span (a prompt chunk, or one decoding token) packed
into a single [1, tokens] forward, then a token sampled for each span that reached its sequence's end."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from batching.attention import SpanStep
from batching.kv_arena import KVArena
from batching.sampler import sample, token_logprobs
from batching.scheduler import Span
from batching.sequence import TokenLogprob


class ModelRunner:
    def __init__(self, model: PreTrainedModel, arena: KVArena) -> None:
        self.model = model
        self.arena = arena
        self.device = model.device

    @torch.inference_mode()
    def step(self, spans: list[Span]) -> list[TokenLogprob]:
        """One token for each span that samples, in span order."""
        ids, positions, slots, attention_spans, kept = [], [], [], [], []
        for span in spans:
            seq, start = span.seq, len(ids)
            ids.extend(seq.all_ids[span.start:span.end])
            positions.extend(range(span.start, span.end))
            slots.extend(range(seq.kv.start + span.start, seq.kv.start + span.end))
            attention_spans.append((start, len(ids), seq.kv.start, span.end))
            kept.extend(start + p - span.start for p in self._logit_positions(span))
        position_tensor = self._tensor(positions)
        step = SpanStep(self.arena, self._tensor(slots), attention_spans)
        logits = self.model(input_ids=self._tensor(ids)[None], position_ids=position_tensor[None],
                            logits_to_keep=self._tensor(kept), use_cache=False, batchwise_step=step).logits[0]
        next_token_logits, offset = [], 0
        for span in spans:
            count = len(self._logit_positions(span))
            span_logits = logits[offset:offset + count]
            offset += count
            if span.seq.params.prompt_logprobs:
                self._record_prompt_logprobs(span, span_logits)
            if span.samples:
                next_token_logits.append(span_logits[-1])
        sampling = [span.seq for span in spans if span.samples]
        return sample(torch.stack(next_token_logits).float(), sampling) if sampling else []

    @staticmethod
    def _prompt_targets(span: Span) -> range:
        """Positions in the span whose logits score the prompt's next token (for echoed prompt logprobs)."""
        if not span.seq.params.prompt_logprobs:
            return range(0)
        return range(span.start, min(span.end, len(span.seq.prompt_ids) - 1))

    def _logit_positions(self, span: Span) -> list[int]:
        positions = list(self._prompt_targets(span))
        if span.samples:
            positions.append(span.end - 1)
        return positions

    def _record_prompt_logprobs(self, span: Span, span_logits: torch.Tensor) -> None:
        seq, targets = span.seq, self._prompt_targets(span)
        if span.start == 0:
            seq.prompt_logprobs = [None]
        if targets:
            logprobs = span_logits[:len(targets)].float().log_softmax(dim=-1)
            ids = [seq.prompt_ids[p + 1] for p in targets]
            seq.prompt_logprobs.extend(token_logprobs(logprobs, ids, [seq.params.logprobs or 0] * len(ids)))

    def _tensor(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)
