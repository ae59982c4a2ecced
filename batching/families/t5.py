"""T5's arithmetic (T5, Flan-T5, mT5), driven layer by layer with the HF modules' own weights: RMS norms before
each sub-layer, unscaled attention, and a learned bias by relative position in the decoder's self-attention
(computed by the first layer's HF module, shared by all layers)."""

from __future__ import annotations

from functools import partial
import torch
from transformers import PreTrainedModel

from batching.attention import Step
from batching.families.encoder_decoder import (CrossAttend, TextInput, cross_attention, encode_text, self_attention,
                                               split_heads)


class T5Family:
    encoded_lengths_vary = True

    def __init__(self, model: PreTrainedModel, max_length: int) -> None:
        self.model = model
        self.encoder = model.get_encoder()
        self.decoder = model.get_decoder()
        self.layers = len(self.decoder.block)
        self.heads = model.config.num_heads
        self.head_dim = model.config.d_kv
        self.max_length = max_length
        self.relative = self.decoder.block[0].layer[0].SelfAttention
        with torch.inference_mode():  # the bias of each key seen from the last of max_length positions
            self.behind = self.relative.compute_bias(1, max_length, past_seen_tokens=max_length - 1)
        # T5 v1.0 scales the decoder's output before its tied LM head; v1.1, Flan-T5 and mT5 do not
        self.output_scale = model.config.d_model ** -0.5 if getattr(model.config, "scale_decoder_outputs", False) \
            else 1.0

    def position_bias(self, queries: int, keys: int) -> torch.Tensor:
        if queries == 1:
            return self.behind[:, :, :, self.max_length - keys:]
        bias = self.relative.compute_bias(queries, keys, past_seen_tokens=keys - queries)
        future = torch.ones(queries, keys, dtype=torch.bool, device=bias.device).triu(keys - queries + 1)
        return bias.masked_fill(future, float("-inf"))

    def row_position_bias(self, positions: torch.Tensor, length: int) -> torch.Tensor:
        """Each row's bias over a whole cache row of `length` (= max_length) positions, its token at
        positions[row]: keys past the token get the bias of the nearest key, and are masked by the caller."""
        keys = torch.arange(length, device=positions.device)
        seen_from_last = (self.max_length - 1 - positions[:, None] + keys).clamp(max=self.max_length - 1)
        return self.behind[0, :, 0, seen_from_last].transpose(0, 1)[:, :, None]

    def encode(self, inputs: list[TextInput]) -> tuple[torch.Tensor, list[int]]:
        return encode_text(self.encoder, inputs, self.model.config.pad_token_id)

    def cross_keys_values(self, layer: int, encoded: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        attention = self.decoder.block[layer].layer[1].EncDecAttention
        return split_heads(attention.k(encoded), self.heads), split_heads(attention.v(encoded), self.heads)

    def decode(self, ids: torch.Tensor, positions: torch.Tensor, step: Step, cross_attend: CrossAttend
               ) -> torch.Tensor:
        """The same arithmetic, in the same order, as T5Stack's forward as a decoder."""
        hidden = self.decoder.embed_tokens(ids)
        for index, block in enumerate(self.decoder.block):
            own, cross, feed_forward = block.layer
            attention = own.SelfAttention
            hidden = hidden + self_attention(attention, (attention.q, attention.k, attention.v, attention.o),
                                             own.layer_norm(hidden), step, self.heads)
            attention = cross.EncDecAttention
            hidden = hidden + cross_attention(attention.q, attention.o, cross.layer_norm(hidden),
                                              partial(cross_attend, index), self.heads)
            hidden = feed_forward(hidden)
        return self.decoder.final_layer_norm(hidden)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(hidden * self.output_scale)
