"""The CPU encoder attention (batching.families.encoder_attention): transformers' eager arithmetic a block of
queries at a time, for Whisper's encoder and for any additive mask."""

from __future__ import annotations

import pytest
import torch
from transformers import WhisperConfig, WhisperForConditionalGeneration
from transformers.models.whisper.modeling_whisper import eager_attention_forward

from batching.families import encoder_attention
from batching.families.encoder_attention import ENCODER_ATTENTION, query_block_attention
from config import Config
from speech.loader import load_whisper


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_whisper_encoder_output_is_eager_attentions(dtype):
    torch.manual_seed(0)
    config = WhisperConfig(d_model=128, encoder_layers=2, decoder_layers=1, encoder_attention_heads=2,
                           decoder_attention_heads=2, encoder_ffn_dim=256, decoder_ffn_dim=256)
    model = WhisperForConditionalGeneration(config).to(dtype).eval()
    features = torch.randn(2, config.num_mel_bins, 2 * config.max_source_positions).to(dtype)
    outputs = {}
    with torch.inference_mode():
        for implementation in ("eager", ENCODER_ATTENTION):
            model.set_attn_implementation(implementation)
            outputs[implementation] = model.model.encoder(features).last_hidden_state
    torch.testing.assert_close(outputs[ENCODER_ATTENTION], outputs["eager"])


@pytest.mark.parametrize("mask_queries", [1, 40])
def test_blocks_and_masks_give_eager_attention(monkeypatch, mask_queries):
    """Blocks of 16 queries over 40 (the last one short), a padding mask per batch item, broadcast over the queries
    or given for each."""
    monkeypatch.setattr(encoder_attention, "SCORES_PER_BLOCK", 1)
    torch.manual_seed(1)
    query, key, value = (torch.randn(2, 3, 40, 8) for _ in range(3))
    mask = torch.zeros(2, 1, mask_queries, 40)
    mask[1, ..., 25:] = torch.finfo(torch.float32).min
    module = torch.nn.Module().eval()
    expected, _ = eager_attention_forward(module, query, key, value, mask, scaling=0.3)
    output, _ = query_block_attention(module, query, key, value, mask, scaling=0.3)
    torch.testing.assert_close(output, expected)


def test_the_server_runs_whisper_with_it_on_the_cpu():
    loaded = load_whisper(Config(serving_type="whisper", torch_dtype="float32", accelerator_type="cpu"))
    assert loaded.model.config._attn_implementation == ENCODER_ATTENTION
