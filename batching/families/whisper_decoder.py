"""Whisper's arithmetic, driven layer by layer with the HF module's own weights: what the eager runner and the
static (compilable) decode step both run, so that the two cannot drift apart."""

from __future__ import annotations

from functools import partial
from typing import Any

import torch

from batching.attention import Step
from batching.families.bart import BartFamily
from batching.families.encoder_decoder import CrossAttend, cross_attention, self_attention


class WhisperFamily(BartFamily):
    """Whisper's decoder is BART's lineage (the same modules and cross-attention projections) with norms before
    each sub-layer, over an audio encoder, and an output projection of its own."""
    encoded_lengths_vary = False  # every window is 30 s of audio

    def encode(self, inputs: list[Any]) -> tuple[torch.Tensor, list[int]]:
        """inputs: speech windows (their log-mel features, [mel bins, frames] each, all as long)."""
        features = torch.stack([window.features for window in inputs]).to(self.model.device, self.model.dtype)
        encoded = self.encoder(features).last_hidden_state
        return encoded, [encoded.shape[1]] * len(inputs)

    def decode(self, ids: torch.Tensor, positions: torch.Tensor, step: Step, cross_attend: CrossAttend
               ) -> torch.Tensor:
        """The same arithmetic, in the same order, as WhisperDecoder's forward."""
        decoder = self.decoder
        hidden = decoder.embed_tokens(ids) + decoder.embed_positions(ids, position_ids=positions)
        for index, layer in enumerate(decoder.layers):
            attention, cross = layer.self_attn, layer.encoder_attn
            hidden = hidden + self_attention(
                attention, (attention.q_proj, attention.k_proj, attention.v_proj, attention.out_proj),
                layer.self_attn_layer_norm(hidden), step, self.heads, attention.scaling)
            hidden = hidden + cross_attention(cross.q_proj, cross.out_proj, layer.encoder_attn_layer_norm(hidden),
                                              partial(cross_attend, index), self.heads, cross.scaling)
            hidden = hidden + layer.fc2(layer.activation_fn(layer.fc1(layer.final_layer_norm(hidden))))
        return decoder.layer_norm(hidden)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.proj_out(hidden)
