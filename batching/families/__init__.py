"""Model-family runners that drive a model's own modules step by step where the core runner's registered
attention function is not enough: encoder-decoder models (an encoder pass, cross-attention K/V kept per row)
with each family's arithmetic (T5, BART, Whisper), and Whisper's decoding rules and beam search, over the
core's scheduler, engine and sampler."""

from __future__ import annotations

from transformers import PreTrainedModel

from batching.families.bart import BartFamily
from batching.families.encoder_decoder import Seq2SeqFamily
from batching.families.t5 import T5Family

TEXT_FAMILIES = {"t5": "T5", "mt5": "mT5", "bart": "BART"}


def text_family(model: PreTrainedModel, max_length: int) -> Seq2SeqFamily:
    """The arithmetic of an encoder-decoder text model whose decoder holds up to max_length tokens."""
    kind = model.config.model_type
    if kind in ("t5", "mt5"):
        return T5Family(model, max_length)
    if kind == "bart":
        return BartFamily(model)
    raise ValueError(f"encoder-decoder models of type {kind!r} are not served; these are: "
                     f"{', '.join(TEXT_FAMILIES.values())}")
