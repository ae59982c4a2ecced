"""Attention over a whole encoder input on the CPU (Whisper's 1500 positions a window): transformers' eager
arithmetic (scores and their softmax in the model's dtype), a block of queries at a time so that the block's
scores stay in cache. In bfloat16 it takes half the time of SDPA's CPU flash kernel, whose blocks are slower
than oneDNN's products on the same shapes; on CUDA, SDPA's kernels are the faster ones and stay."""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

ENCODER_ATTENTION = "batchwise_encoder"
# a block's scores: 2 MB in bfloat16; much larger blocks cost page faults on every allocation
SCORES_PER_BLOCK = 1 << 20
MIN_BLOCK_QUERIES = 16


def query_block_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                          **kwargs: object) -> tuple[torch.Tensor, None]:
    """query, key, value: [batch, heads, positions, dim]; attention_mask: additive, [batch, 1, queries, keys]
    or broadcastable to it. Returns the output as [batch, queries, heads, dim], as eager attention does."""
    if dropout and module.training:
        raise ValueError("the encoder attention is for inference: it has no dropout")
    batch, heads, queries, dim = query.shape
    # scaling the query, not the scores, is 23 times less work; for Whisper's 64-dimension heads (scale 1/8) the
    # result is the same to the bit
    scaling = dim ** -0.5 if scaling is None else scaling
    rows = max(MIN_BLOCK_QUERIES, SCORES_PER_BLOCK // (heads * key.shape[-2]))
    output = torch.empty_like(query)
    keys = key.transpose(-1, -2)
    for index in range(batch):
        for start in range(0, queries, rows):
            block = slice(start, start + rows)
            scores = torch.matmul(query[index, :, block] * scaling, keys[index])
            if attention_mask is not None:
                scores = scores + mask_block(attention_mask, index, block)
            output[index, :, block] = torch.matmul(scores.softmax(-1), value[index])
    return output.transpose(1, 2).contiguous(), None


def mask_block(mask: torch.Tensor, index: int, block: slice) -> torch.Tensor:
    row = mask[index if mask.shape[0] > 1 else 0]
    return row[:, block] if row.shape[-2] > 1 else row


AttentionInterface.register(ENCODER_ATTENTION, query_block_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(ENCODER_ATTENTION, eager_mask)
