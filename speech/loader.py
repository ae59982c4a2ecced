"""Find, convert and load a Whisper model (the embedded tiny.en, a CTranslate2 folder, an HF id or folder),
and build the continuous-batching engine that decodes it."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from transformers import GenerationConfig, WhisperForConditionalGeneration, WhisperProcessor

from batching import Engine
from batching.build import whisper_engine
from batching.families.encoder_attention import ENCODER_ATTENTION
from batching.families.whisper_rules import RuleSettings, WhisperTokens
from config import EMBEDDED_CHAT_MODEL, Config
from converters.ct2_whisper import EMBEDDED_WHISPER_NAME, cached_ct2_whisper_conversion, embedded_whisper_path
from model_manager import convert_linears, engine_settings, served_name

logger = logging.getLogger("batchwise.model")

_MULTILINGUAL_VOCAB = 51865  # English-only Whisper models have 51864 tokens


@dataclass
class LoadedWhisper:
    model: WhisperForConditionalGeneration
    processor: WhisperProcessor
    name: str
    tokens: WhisperTokens
    rules: RuleSettings

    @property
    def multilingual(self) -> bool:
        return bool(self.tokens.languages)


def whisper_source(config: Config) -> Path | str:
    """A folder or hub id that from_pretrained can load; CTranslate2 folders are converted once and cached."""
    if config.hf_model == EMBEDDED_CHAT_MODEL:  # no model named: serve the embedded speech model
        return cached_ct2_whisper_conversion(embedded_whisper_path(), Path(config.model_cache_dir),
                                             name=EMBEDDED_WHISPER_NAME)
    if (Path(config.hf_model) / "model.bin").is_file():
        return cached_ct2_whisper_conversion(Path(config.hf_model), Path(config.model_cache_dir))
    return config.hf_model


def whisper_tokens(processor: WhisperProcessor, generation: GenerationConfig, vocab_size: int) -> WhisperTokens:
    vocab = processor.tokenizer.get_vocab()
    multilingual = getattr(generation, "is_multilingual", None)
    if multilingual is None:
        multilingual = vocab_size >= _MULTILINGUAL_VOCAB
    lang_to_id = (getattr(generation, "lang_to_id", None) or {}) if multilingual else {}
    languages = {token.strip("<|>"): token_id for token, token_id in lang_to_id.items()}
    return WhisperTokens(
        end_of_text=vocab["<|endoftext|>"],
        start_of_transcript=vocab["<|startoftranscript|>"],
        no_timestamps=vocab["<|notimestamps|>"],
        start_of_previous=vocab.get("<|startofprev|>"),
        # multilingual vocabularies call it <|nospeech|>, English-only ones <|nocaptions|>
        no_speech=vocab.get("<|nospeech|>", vocab.get("<|nocaptions|>")),
        transcribe=vocab.get("<|transcribe|>"),
        translate=vocab.get("<|translate|>"),
        languages=languages,
    )


def rule_settings(generation: GenerationConfig) -> RuleSettings:
    max_initial = getattr(generation, "max_initial_timestamp_index", None)
    return RuleSettings(suppress=tuple(generation.suppress_tokens or ()),
                        max_initial_timestamp_index=50 if max_initial is None else max_initial)


def load_whisper(config: Config) -> LoadedWhisper:
    source = whisper_source(config)
    logger.info("loading Whisper %s on %s as %s (%s)", source, config.device, *config.dtype_choice())
    started = time.perf_counter()
    processor = WhisperProcessor.from_pretrained(source, **config.hub_options())
    # the encoder's attention: query blocks on the CPU, SDPA on CUDA (batching.families.encoder_attention); the
    # decoder is driven by the runner with the engine's own attention whatever this says
    attention = ENCODER_ATTENTION if config.device == "cpu" else "sdpa"
    model = WhisperForConditionalGeneration.from_pretrained(source, dtype=config.dtype, attn_implementation=attention,
                                                            **config.hub_options())
    model.to(config.device).eval()
    convert_linears(model, config)  # the encoder's and decoder's linear layers; --int8 the output projection too
    generation = model.generation_config
    loaded = LoadedWhisper(model, processor, served_name(config.hf_model, EMBEDDED_WHISPER_NAME),
                           whisper_tokens(processor, generation, model.config.vocab_size), rule_settings(generation))
    logger.info("loaded %s in %.1f s (%s)", source, time.perf_counter() - started,
                "multilingual" if loaded.multilingual else "English-only")
    return loaded


def build_whisper_engine(loaded: LoadedWhisper, config: Config) -> Engine:
    """The engine that decodes the model's windows; run it off the event loop (it allocates the caches)."""
    return whisper_engine(loaded.model, loaded.processor.tokenizer, loaded.tokens, loaded.rules,
                          engine_settings(config, loaded.model.device))
