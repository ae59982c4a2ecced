"""Model forwards for one engine step: a packed prefill of newly admitted prompts, a decode of the rest."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from batching.attention import DecodeStep, PrefillStep, pack_prompts
from batching.kv_cache import RowKVCache
from batching.sampler import sample, token_logprobs
from batching.sequence import Sequence, TokenLogprob


class ModelRunner:
    def __init__(self, model: PreTrainedModel, cache: RowKVCache) -> None:
        self.model = model
        self.cache = cache
        self.device = model.device

    @torch.inference_mode()
    def step(self, prefilling: list[Sequence], decoding: list[Sequence]) -> list[TokenLogprob]:
        """Return one sampled token per sequence, prefilling first, then decoding."""
        logits = []
        if prefilling:
            logits.append(self._prefill_logits(prefilling))
        if decoding:
            logits.append(self._decode_logits(decoding))
        return sample(torch.cat(logits).float(), prefilling + decoding)

    def _prefill_logits(self, seqs: list[Sequence]) -> torch.Tensor:
        """Prefill each distinct prompt once; siblings sharing a prefix get a copy of its KV row."""
        owners = [s for s in seqs if s.prefix_source is None]
        self.cache.reserve(max(len(s.prompt_ids) for s in owners))
        ids, positions, rows, spans = pack_prompts(owners)
        kept = [index for seq, (start, end) in zip(owners, spans)
                for index in (range(start, end) if seq.params.prompt_logprobs else [end - 1])]
        position_tensor = self._tensor(positions)
        step = PrefillStep(self.cache, self._tensor(rows), position_tensor, spans)
        output = self.model(input_ids=self._tensor(ids)[None], position_ids=position_tensor[None],
                            logits_to_keep=self._tensor(kept), use_cache=False, batchwise_step=step)
        next_token_logits = {}
        offset = 0
        for seq in owners:
            count = len(seq.prompt_ids) if seq.params.prompt_logprobs else 1
            seq_logits = output.logits[0, offset:offset + count]
            offset += count
            if seq.params.prompt_logprobs:
                top_counts = [seq.params.logprobs or 0] * (count - 1)
                logprobs = seq_logits[:-1].float().log_softmax(dim=-1)
                seq.prompt_logprobs = [None, *token_logprobs(logprobs, seq.prompt_ids[1:], top_counts)]
            next_token_logits[seq] = seq_logits[-1]
        for seq in seqs:
            if seq.prefix_source is not None:
                self.cache.move_row(seq.prefix_source.row, seq.row, len(seq.prompt_ids))
                next_token_logits[seq] = next_token_logits[seq.prefix_source]
                seq.prefix_source = None
        return torch.stack([next_token_logits[s] for s in seqs])

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
