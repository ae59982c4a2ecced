"""The attention function every HF model in the engine runs through, registered with transformers'
AttentionInterface: the model is loaded with ``attn_implementation="batchwise"`` and called without a
transformers Cache; each attention layer hands its new keys/values to ``batchwise_attention``, which
writes them into the rows of ``RowKVCache`` and attends over them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

from batching.kv_cache import RowKVCache
from batching.sequence import Sequence

ATTENTION_NAME = "batchwise"


@dataclass
class PrefillStep:
    cache: RowKVCache
    rows: torch.Tensor
    positions: torch.Tensor
    spans: list[tuple[int, int]]


@dataclass
class DecodeStep:
    cache: RowKVCache
    positions: torch.Tensor
    lengths: list[int]

    @property
    def rows(self) -> torch.Tensor:
        return torch.arange(len(self.lengths), device=self.positions.device)


def pack_prompts(seqs: list[Sequence]) -> tuple[list[int], list[int], list[int], list[tuple[int, int]]]:
    """The prompts laid end to end: token ids, each token's position and row, and each prompt's span."""
    ids, positions, rows, spans = [], [], [], []
    for seq in seqs:
        spans.append((len(ids), len(ids) + len(seq.prompt_ids)))
        ids.extend(seq.prompt_ids)
        positions.extend(range(len(seq.prompt_ids)))
        rows.extend([seq.row] * len(seq.prompt_ids))
    return ids, positions, rows, spans


def batchwise_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask: torch.Tensor | None, scaling: float | None = None,
                        batchwise_step: PrefillStep | DecodeStep | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    if batchwise_step is None:
        raise RuntimeError("batchwise attention needs a batchwise_step argument (the model runner passes it)")
    if isinstance(batchwise_step, PrefillStep):
        return _prefill_attention(module, query, key, value, scaling, batchwise_step), None
    return _decode_attention(module, query, key, value, scaling, batchwise_step), None


def _prefill_attention(module, query, key, value, scaling, step: PrefillStep) -> torch.Tensor:
    """Packed prompts ([1, heads, tokens, dim]); each attends causally to its own span only."""
    step.cache.write(module.layer_idx, step.rows, step.positions, key[0].transpose(0, 1), value[0].transpose(0, 1))
    outputs = [
        F.scaled_dot_product_attention(query[:, :, start:end], key[:, :, start:end], value[:, :, start:end],
                                       is_causal=True, scale=scaling, enable_gqa=True)
        for start, end in step.spans
    ]
    return torch.cat(outputs, dim=2).transpose(1, 2)


def _decode_attention(module, query, key, value, scaling, step: DecodeStep) -> torch.Tensor:
    """One new token per row ([B, heads, 1, dim]), each attending to exactly its own cached length.
    Rows are attended one by one: a row's result is then bit-identical whatever its neighbours'
    lengths (a padded, masked batch changes the summation order inside the kernel). Query heads
    sharing a KV head are laid along the query axis, so K/V are never repeated or copied."""
    batch, heads, _, head_dim = query.shape
    cached_keys, cached_values = step.cache.write(module.layer_idx, step.rows, step.positions,
                                                  key[:, :, 0], value[:, :, 0])
    kv_heads = cached_keys.shape[1]
    grouped_query = query.reshape(batch, kv_heads, heads // kv_heads, head_dim)
    output = torch.cat([
        F.scaled_dot_product_attention(grouped_query[row:row + 1], cached_keys[row:row + 1, :, :length],
                                       cached_values[row:row + 1, :, :length], scale=scaling)
        for row, length in enumerate(step.lengths)
    ])
    return output.reshape(batch, heads, 1, head_dim).transpose(1, 2)


def _no_mask(*args, **kwargs) -> None:
    return None


AttentionInterface.register(ATTENTION_NAME, batchwise_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION_NAME, _no_mask)
