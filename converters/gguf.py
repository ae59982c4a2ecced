"""Convert a GGUF file into a plain transformers (safetensors) folder. transformers de-quantises GGUF
weights on every load (about 20 s for the embedded SmolLM2); the converted copy reloads in under one."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
import transformers

from converters.cache import cached_conversion

CONVERTER_VERSION = 1


def convert_gguf(gguf: Path, out_dir: Path) -> None:
    tokenizer = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # the weights are de-quantised on load; drop the GGUF quantiser so save_pretrained writes plain tensors
    model.hf_quantizer = None
    model.is_quantized = False
    model.config.__dict__.pop("quantization_config", None)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def cached_gguf_conversion(gguf: Path, cache_dir: Path) -> Path:
    return cached_conversion(gguf, cache_dir, gguf.stem, partial(convert_gguf, gguf), CONVERTER_VERSION)
