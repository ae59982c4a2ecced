"""BART's arithmetic, driven layer by layer with the HF modules' own weights: learned positions (offset by 2),
a norm after the embeddings and after each sub-layer, and a bias on the final logits."""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from batching.attention import Step
from batching.families.encoder_decoder import (CrossAttend, TextInput, cross_attention, encode_text, self_attention,
                                               split_heads)


class BartFamily:
    position_bias = None
    row_position_bias = None
    encoded_lengths_vary = True

    def __init__(self, model: PreTrainedModel) -> None:
        self.model = model
        self.encoder = model.get_encoder()
        self.decoder = model.get_decoder()
        self.layers = len(self.decoder.layers)
        self.heads = model.config.decoder_attention_heads
        self.head_dim = model.config.d_model // self.heads

    def encode(self, inputs: list[TextInput]) -> tuple[torch.Tensor, list[int]]:
        return encode_text(self.encoder, inputs, self.model.config.pad_token_id)

    def cross_keys_values(self, layer: int, encoded: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        attention = self.decoder.layers[layer].encoder_attn
        return split_heads(attention.k_proj(encoded), self.heads), split_heads(attention.v_proj(encoded), self.heads)

    def decode(self, ids: torch.Tensor, positions: torch.Tensor, step: Step, cross_attend: CrossAttend
               ) -> torch.Tensor:
        """The same arithmetic, in the same order, as BartDecoder's forward."""
        decoder = self.decoder
        learned = decoder.embed_positions
        hidden = decoder.embed_tokens(ids) + F.embedding(positions + learned.offset, learned.weight)
        hidden = decoder.layernorm_embedding(hidden)
        for index, layer in enumerate(decoder.layers):
            attention, cross = layer.self_attn, layer.encoder_attn
            hidden = layer.self_attn_layer_norm(hidden + self_attention(
                attention, (attention.q_proj, attention.k_proj, attention.v_proj, attention.out_proj), hidden, step,
                self.heads, attention.scaling))
            hidden = layer.encoder_attn_layer_norm(hidden + cross_attention(
                cross.q_proj, cross.out_proj, hidden, partial(cross_attend, index), self.heads, cross.scaling))
            hidden = layer.final_layer_norm(hidden + layer.fc2(layer.activation_fn(layer.fc1(hidden))))
        return hidden

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(hidden) + self.model.final_logits_bias
