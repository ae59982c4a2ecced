"""PEFT LoRA adapters of a tiny model, and peft's own outputs with them: the reference the LoRA tests compare with."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model

TOKENS = 16  # greedy tokens per request


def save_adapter(base: Path, folder: Path, seed: int, **settings) -> Path:
    """A PEFT LoRA adapter of the base with random A and B (init_lora_weights=False: B is not zero)."""
    torch.manual_seed(seed)
    model = get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(init_lora_weights=False, **settings))
    model.save_pretrained(folder)
    return folder


def reference(folders: dict[str | None, Path], name: str | None, dtype: torch.dtype = torch.float32):
    model = transformers.AutoModelForCausalLM.from_pretrained(folders[None], dtype=dtype, attn_implementation="sdpa")
    return (PeftModel.from_pretrained(model, folders[name]) if name else model).eval()


def peft_tokens(folders, name: str | None, prompt: list[int], tokens: int = TOKENS) -> list[int]:
    # no end-of-sequence token, as the engine's rows ignore it
    output = reference(folders, name).generate(torch.tensor([prompt]), max_new_tokens=tokens, do_sample=False,
                                               eos_token_id=None, pad_token_id=0)
    return output[0, len(prompt):].tolist()
