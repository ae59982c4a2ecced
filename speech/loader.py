"""Find, convert and load a Whisper model (the embedded tiny.en, a CTranslate2 folder, an HF id or folder),
and build the continuous-batching engine that decodes it."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from transformers import GenerationConfig, WhisperForConditionalGeneration, WhisperProcessor

from batching import Engine, Scheduler
from batching.families.encoder_attention import ENCODER_ATTENTION
from batching.families.encoder_decoder_cache import EncoderDecoderRows
from batching.families.whisper_decoder import WhisperFamily
from batching.families.whisper_rules import RuleSettings, WhisperLogitRules, WhisperTokens
from batching.families.whisper_runner import WhisperRunner, alignment_heads
from batching.runner import min_rows
from config import EMBEDDED_CHAT_MODEL, Config
from converters.ct2_whisper import EMBEDDED_WHISPER_NAME, cached_ct2_whisper_conversion, embedded_whisper_path
from model_manager import convert_linears, engine_options, served_name, static_row_decoder

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
    processor = WhisperProcessor.from_pretrained(source)
    # the encoder's attention: query blocks on the CPU, SDPA on CUDA (batching.families.encoder_attention); the
    # decoder is driven by the runner with the engine's own attention whatever this says
    attention = ENCODER_ATTENTION if config.device == "cpu" else "sdpa"
    model = WhisperForConditionalGeneration.from_pretrained(source, dtype=config.dtype, attn_implementation=attention)
    model.to(config.device).eval()
    convert_linears(model, config)  # the encoder's and decoder's linear layers; --int8 the output projection too
    generation = model.generation_config
    loaded = LoadedWhisper(model, processor, served_name(config.hf_model, EMBEDDED_WHISPER_NAME),
                           whisper_tokens(processor, generation, model.config.vocab_size), rule_settings(generation))
    logger.info("loaded %s in %.1f s (%s)", source, time.perf_counter() - started,
                "multilingual" if loaded.multilingual else "English-only")
    return loaded


def build_whisper_engine(loaded: LoadedWhisper, config: Config) -> Engine:
    batch_size = config.continuous_batching_batch_size
    model, static = loaded.model, config.static_cache or config.torch_compile
    cache = EncoderDecoderRows(max_rows=batch_size, max_length=model.config.max_target_positions,
                               max_source=model.config.max_source_positions,
                               beams=config.whisper_beam_size, static=static)
    if config.whisper_beam_size > 1:
        logger.info("windows at temperature 0 are decoded with %d beams (a batch row each)", config.whisper_beam_size)
    # the prompts of a whole batch of windows in one step: the runner prefills a prompt whole, never in chunks
    step_tokens = batch_size * model.config.max_target_positions
    scheduler = Scheduler(cache, max_running=batch_size, max_pending=config.max_concurrent, step_tokens=step_tokens,
                          batch_invariant=config.batch_invariant)
    smallest = min_rows(config.batch_invariant)
    decoder = static_row_decoder(WhisperFamily(model), cache, model, config, sorted(alignment_heads(model)),
                                 smallest=smallest, names=("Whisper decode step", "window")) if static else None
    runner = WhisperRunner(model, cache, WhisperLogitRules(loaded.tokens, loaded.rules), decoder, smallest)
    return Engine(runner, scheduler, loaded.processor.tokenizer, frozenset({loaded.tokens.end_of_text}),
                  config.continuous_batching_microsleep, **engine_options(config))
