"""Tiny random-weight decoders built from a config, loaded with the engine's attention function."""

from __future__ import annotations

import torch
import transformers

from batching import ATTENTION_NAME

TINY_SIZES = dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, positions=1024)


def tiny_config(architecture: str, vocab_size: int) -> transformers.PretrainedConfig:
    s = TINY_SIZES
    if architecture == "gpt2":
        return transformers.GPT2Config(vocab_size=vocab_size, n_embd=s["hidden"], n_layer=s["layers"],
                                       n_head=s["heads"], n_positions=s["positions"], eos_token_id=2, bos_token_id=1)
    config_class = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}[architecture]
    return config_class(vocab_size=vocab_size, hidden_size=s["hidden"], num_hidden_layers=s["layers"],
                        num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"],
                        intermediate_size=s["intermediate"], max_position_embeddings=s["positions"],
                        eos_token_id=2, bos_token_id=1, tie_word_embeddings=True)


def tiny_model(architecture: str, vocab_size: int, seed: int = 0) -> transformers.PreTrainedModel:
    """A random-weight model; weights are scaled up so greedy output varies token to token."""
    torch.manual_seed(seed)
    config = tiny_config(architecture, vocab_size)
    config._attn_implementation = ATTENTION_NAME
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=ATTENTION_NAME)
    return model.eval()


def byte_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """One token per byte (byte-level BPE without merges) and <eos> as token 0: grammar masks can be read
    off character by character."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokenizer = Tokenizer(models.BPE({"<eos>": 0, **{char: i + 1 for i, char in enumerate(alphabet)}}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<eos>")
