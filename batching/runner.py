"""Model forwards for one engine step: a packed prefill of newly admitted prompts, a decode of the rest."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from batching.kv_cache import DecodeStep, PrefillStep, RowKVCache
from batching.sampler import sample
from batching.sequence import Sequence


class ModelRunner:
    def __init__(self, model: PreTrainedModel, cache: RowKVCache) -> None:
        self.model = model
        self.cache = cache
        self.device = model.device

    @torch.inference_mode()
    def step(self, prefilling: list[Sequence], decoding: list[Sequence]) -> list[int]:
        """Return one sampled token per sequence, prefilling first, then decoding."""
        logits = []
        if prefilling:
            logits.append(self._prefill_logits(prefilling))
        if decoding:
            logits.append(self._decode_logits(decoding))
        return sample(torch.cat(logits).float(), prefilling + decoding)

    def _prefill_logits(self, seqs: list[Sequence]) -> torch.Tensor:
        self.cache.reserve(max(len(s.prompt_ids) for s in seqs))
        spans, rows, positions, ids = [], [], [], []
        for seq in seqs:
            start = len(ids)
            ids.extend(seq.prompt_ids)
            spans.append((start, len(ids)))
            rows.extend([seq.row] * len(seq.prompt_ids))
            positions.extend(range(len(seq.prompt_ids)))
        position_tensor = self._tensor(positions)
        step = PrefillStep(self.cache, self._tensor(rows), position_tensor, spans)
        last_tokens = self._tensor([end - 1 for _, end in spans])
        output = self.model(input_ids=self._tensor(ids)[None], position_ids=position_tensor[None],
                            logits_to_keep=last_tokens, use_cache=False, batchwise_step=step)
        return output.logits[0]

    def _decode_logits(self, seqs: list[Sequence]) -> torch.Tensor:
        lengths = [s.length for s in seqs]
        self.cache.reserve(max(lengths))
        positions = self._tensor([length - 1 for length in lengths])
        step = DecodeStep(self.cache, positions, lengths)
        input_ids = self._tensor([s.last_token for s in seqs])[:, None]
        output = self.model(input_ids=input_ids, position_ids=positions[:, None], logits_to_keep=1,
                            use_cache=False, batchwise_step=step)
        return output.logits[:, -1]

    def _tensor(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)
