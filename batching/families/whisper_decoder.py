"""Whisper's decoder arithmetic, driven layer by layer with the HF module's own weights: what the eager runner
and the static (compilable) decode step both run, so that the two cannot drift apart."""

from __future__ import annotations

from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F

from batching.attention import Step, batchwise_attention

CrossAttend = Callable[[int, torch.Tensor], torch.Tensor]  # (layer, query [N, heads, L, dim]) -> output


def split_heads(states: torch.Tensor, heads: int) -> torch.Tensor:
    """[N, L, heads * dim] -> [N, heads, L, dim]"""
    return states.view(*states.shape[:2], heads, -1).transpose(1, 2)


def run_decoder(decoder: torch.nn.Module, ids: torch.Tensor, positions: torch.Tensor, step: Step,
                cross_attend: CrossAttend) -> torch.Tensor:
    """ids/positions: [N, L]; the same arithmetic, in the same order, as WhisperDecoder's forward. Self-attention
    goes through batching.attention with `step`; cross-attention through `cross_attend`."""
    heads = decoder.config.decoder_attention_heads
    hidden = decoder.embed_tokens(ids) + decoder.embed_positions(ids, position_ids=positions)
    for index, layer in enumerate(decoder.layers):
        hidden = hidden + _self_attention(layer.self_attn, layer.self_attn_layer_norm(hidden), step, heads)
        hidden = hidden + _cross_attention(layer.encoder_attn, layer.encoder_attn_layer_norm(hidden),
                                           partial(cross_attend, index), heads)
        hidden = hidden + layer.fc2(layer.activation_fn(layer.fc1(layer.final_layer_norm(hidden))))
    return decoder.layer_norm(hidden)


def attend_audio(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, beams: int) -> torch.Tensor:
    """Cross-attention of one token per row ([windows x beams, heads, 1, dim]) over each window's audio K/V
    ([windows, heads, frames, dim]): a window's beams are laid along the query axis of one attention. Every
    window's audio has the same length, so there is no mask."""
    windows, heads = keys.shape[0], keys.shape[1]
    grouped = query.reshape(windows, beams, heads, -1).transpose(1, 2)  # [windows, heads, beams, dim]
    output = F.scaled_dot_product_attention(grouped, keys, values, scale=1.0)
    return output.transpose(1, 2).reshape(windows * beams, 1, heads, -1).transpose(1, 2)


def _self_attention(attention: torch.nn.Module, hidden: torch.Tensor, step: Step, heads: int) -> torch.Tensor:
    query = split_heads(attention.q_proj(hidden) * attention.scaling, heads)
    key, value = split_heads(attention.k_proj(hidden), heads), split_heads(attention.v_proj(hidden), heads)
    output, _ = batchwise_attention(attention, query, key, value, None, scaling=1.0, batchwise_step=step)
    return attention.out_proj(output.reshape(hidden.shape))


def _cross_attention(attention: torch.nn.Module, hidden: torch.Tensor,
                     attend: Callable[[torch.Tensor], torch.Tensor], heads: int) -> torch.Tensor:
    output = attend(split_heads(attention.q_proj(hidden) * attention.scaling, heads))
    return attention.out_proj(output.transpose(1, 2).reshape(hidden.shape))
