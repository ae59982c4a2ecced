"""Speculative decoding with a draft model: a smaller causal LM with the target's tokenizer proposes each drafting
row's next tokens greedily, one forward per token, over the row's own cache of the draft's K/V (a transformers
DynamicCache). The target verifies them as it verifies n-gram drafts (batching.speculative.verify): greedy drafts
are a one-hot proposal, so rejection sampling keeps every row's output distribution.

Caches are kept only for the rows of the latest step that drafted (at most SpeculativeSettings.max_sequences),
so the draft's memory is bounded by max_sequences x the context; a row's cache is cut back to the tokens the row
still has (the draft tokens the target rejected go) and rebuilt from its tokens when it drafts again after a
pause."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import DynamicCache, PreTrainedModel

from batching.scheduler import Span


@dataclass
class DraftCache:
    kv: DynamicCache = field(default_factory=DynamicCache)
    ids: list[int] = field(default_factory=list)  # the tokens whose K/V the cache holds


class DraftModel:
    def __init__(self, model: PreTrainedModel, vocab_size: int) -> None:
        """vocab_size: the target's logits' width; a draft's padded vocabulary beyond it is never proposed."""
        self.model = model
        self.vocab_size = vocab_size
        self.caches: dict[int, DraftCache] = {}

    @torch.inference_mode()
    def draft(self, spans: list[Span]) -> None:
        """Fill in the draft of each span the scheduler gave room for one."""
        drafting = [span for span in spans if span.draft_room]
        self.caches = {span.seq.seq_id: self.caches.get(span.seq.seq_id) or DraftCache() for span in drafting}
        for span in drafting:
            span.draft = self._propose(self.caches[span.seq.seq_id], span.seq.all_ids, span.draft_room)

    def _propose(self, cache: DraftCache, ids: list[int], limit: int) -> tuple[int, ...]:
        kept = min(common_prefix(cache.ids, ids), len(ids) - 1)  # at least the last token is fed
        cache.kv.crop(kept - len(cache.ids))  # a negative count: the tokens to remove
        del cache.ids[kept:]
        fresh, draft = ids[kept:], []
        for _ in range(limit):
            logits = self.model(input_ids=torch.tensor([fresh], device=self.model.device), past_key_values=cache.kv,
                                use_cache=True).logits[0, -1, :self.vocab_size]
            cache.ids.extend(fresh)
            fresh = [int(logits.argmax())]
            draft.append(fresh[0])
        return tuple(draft)


def common_prefix(first: list[int], second: list[int]) -> int:
    length = min(len(first), len(second))
    differ = np.flatnonzero(np.asarray(first[:length]) != np.asarray(second[:length]))
    return int(differ[0]) if len(differ) else length
