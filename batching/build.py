"""Engines assembled from a loaded model's parts and one EngineSettings: a decoder's over a KV arena sized by the
budget, a text encoder-decoder's and Whisper's over a row of K/V per sequence. Build off the event loop: building
probes the model and allocates its caches."""

from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedModel, WhisperForConditionalGeneration

from batching.attention import kv_layout
from batching.detokenizer import Decoder
from batching.draft_model import DraftModel
from batching.engine import Engine
from batching.failpoints import Failpoint, Failpoints
from batching.families.encoder_decoder import EncoderDecoderRunner, Seq2SeqFamily
from batching.families.encoder_decoder_cache import EncoderDecoderRows
from batching.families.encoder_decoder_static import StaticRowDecoder
from batching.families.whisper_decoder import WhisperFamily
from batching.families.whisper_rules import RuleSettings, WhisperLogitRules, WhisperTokens
from batching.families.whisper_runner import WhisperRunner, alignment_heads
from batching.kv_arena import KVArena, KVLayout, Slots
from batching.lora import LoraLayers
from batching.pooling import Pooling, PoolingRunner, PromptsOnly
from batching.profiler import StepProfiler
from batching.runner import ModelRunner
from batching.scheduler import Scheduler
from batching.speculative import Drafter, NgramDrafter, SpeculativeSettings
from batching.static_decode import StaticDecoder, rows_attend_anywhere
from kernels import decode_attention, logits

logger = logging.getLogger("batchwise.model")

AUTO_KV_FRACTION = {False: 0.25, True: 0.6}  # of free memory, by whether the device is CUDA
SOLO_PREFILL_TOKENS = 2048  # prompt tokens per step with nothing decoding
STATIC_PROMPT_TOKENS = 64  # the most prompt tokens a step may add beside decoding rows for them to join its static step


@dataclass(frozen=True)
class EngineSettings:
    """What an engine is built with besides its model, each rule that derives one setting from others already
    applied (model_manager.engine_settings)."""
    batch_size: int  # the most sequences running at once
    max_pending: int  # the most sequences waiting to run
    microsleep: float  # the engine loop's pause between steps
    batch_invariant: bool
    min_rows: int  # the fewest rows a forward runs
    static_step: bool  # a static-shape decode step over a cache allocated up front
    compile_mode: str | None  # the static step's torch.compile mode; None: it runs eagerly
    saved_steps: Path | None  # where compiled static steps are saved for later starts; None: compiled at each start
    compile_missing: bool  # False: a static step not saved runs eagerly until another process saves it (auto)
    static_length: int  # the most tokens of a decoder's static row (within its context)
    step_tokens: int  # a decoder's prompt tokens per step beside decoding rows (the most, where timed_chunks)
    kv_memory: int | float | None  # a decoder's KV budget: bytes, a fraction of free memory, None: AUTO_KV_FRACTION
    prefix_caching: bool
    beams: int  # Whisper's beams at temperature 0
    step_timeout: float | None
    failpoints: tuple[Failpoint, ...] = ()
    speculative: SpeculativeSettings | None = None  # a decoder's drafts; None: no speculative decoding
    profile_dir: Path | None = None  # profile the first profile_steps steps into it
    profile_steps: int = 0
    timed_chunks: bool = False  # a decoder's prompt chunks beside decoding rows sized by measured step time


def decoder_engine(model: PreTrainedModel, tokenizer: Decoder, eos_token_ids: frozenset[int], context_length: int,
                   weights: int, settings: EngineSettings, lora: LoraLayers | None = None) -> Engine:
    """A decoder's engine over a KV arena sized by the budget; `weights`: the model's weights, quantised ones
    counted as the float weights they stand for (converters.linear_layers.weight_count); `lora`: the model's LoRA
    layers, if it has them."""
    batch_size = settings.batch_size
    layout = kv_layout(model)
    # the running batch at full context, plus as much again for the prefix cache
    tokens = kv_budget_tokens(settings.kv_memory, layout, 2 * batch_size * context_length)
    slots = None
    if settings.static_step:
        slots = Slots(batch_size, min(settings.static_length, context_length))
        logger.info("static cache: %d rows of %d tokens", slots.rows, slots.length)
    arena = KVArena(layout, tokens, settings.prefix_caching, slots)
    if model.device.type == "cpu":
        for kernel in (decode_attention, logits):
            kernel.library()  # built (or found missing, and said so) now rather than in the first step
    logger.info("KV budget: %d tokens (%.2f GiB at %d KB per token); prefix caching %s; %d prompt tokens per step "
                "beside decoding rows%s%s", tokens, tokens * layout.bytes_per_token / 2**30,
                layout.bytes_per_token // 1024, "on" if settings.prefix_caching else "off", settings.step_tokens,
                " at most, sized by measured step time" if settings.timed_chunks else "",
                ", batch-invariant" if settings.batch_invariant else "")
    scheduler = Scheduler(arena, max_running=batch_size, max_pending=settings.max_pending,
                          step_tokens=settings.step_tokens, solo_tokens=SOLO_PREFILL_TOKENS,
                          batch_invariant=settings.batch_invariant,
                          attention_cost=attention_cost(model, layout, weights), speculative=settings.speculative,
                          timed_chunks=settings.timed_chunks)
    static = None
    if slots is not None:
        static = StaticDecoder(model, arena, settings.compile_mode, settings.min_rows,
                               static_prompt_tokens(layout, settings), lora.rows if lora else None,
                               settings.saved_steps, settings.compile_missing)
    runner = ModelRunner(model, arena, static, settings.batch_invariant, drafter(model, settings.speculative), lora)
    return engine(runner, scheduler, tokenizer, eos_token_ids, settings)


def encoder_decoder_engine(family: Seq2SeqFamily, model: PreTrainedModel, tokenizer: Decoder,
                           eos_token_ids: frozenset[int], encoder_length: int, decoder_length: int,
                           settings: EngineSettings) -> Engine:
    """A text encoder-decoder's engine (T5, BART): a row per sequence, each holding its encoder input's
    cross-attention K/V and its decoder tokens' self-attention K/V."""
    batch_size = settings.batch_size
    cache = EncoderDecoderRows(batch_size, decoder_length, encoder_length, static=settings.static_step)
    if not settings.static_step:
        row_bytes = 2 * family.layers * family.heads * family.head_dim * model.dtype.itemsize
        logger.info("K/V memory: at most %.1f MiB (%d rows of %d encoder and %d decoder positions)",
                    batch_size * row_bytes * (encoder_length + decoder_length) / 2**20, batch_size,
                    encoder_length, decoder_length)
    # a whole batch of decoder prompts in one step: the runner prefills them whole, never in chunks
    scheduler = Scheduler(cache, max_running=batch_size, max_pending=settings.max_pending,
                          step_tokens=batch_size * decoder_length, batch_invariant=settings.batch_invariant)
    static = static_row_decoder(family, cache, model, settings) if settings.static_step else None
    runner = EncoderDecoderRunner(family, cache, model.device, settings.min_rows, static)
    return engine(runner, scheduler, tokenizer, eos_token_ids, settings)


def whisper_engine(model: WhisperForConditionalGeneration, tokenizer: Decoder, tokens: WhisperTokens,
                   rules: RuleSettings, settings: EngineSettings) -> Engine:
    """Whisper's engine: a row per 30-second window (a row per beam with beams)."""
    batch_size = settings.batch_size
    cache = EncoderDecoderRows(max_rows=batch_size, max_length=model.config.max_target_positions,
                               max_source=model.config.max_source_positions, beams=settings.beams,
                               static=settings.static_step)
    if settings.beams > 1:
        logger.info("windows at temperature 0 are decoded with %d beams (a batch row each)", settings.beams)
    # the prompts of a whole batch of windows in one step: the runner prefills a prompt whole, never in chunks
    scheduler = Scheduler(cache, max_running=batch_size, max_pending=settings.max_pending,
                          step_tokens=batch_size * model.config.max_target_positions,
                          batch_invariant=settings.batch_invariant)
    static = static_row_decoder(WhisperFamily(model), cache, model, settings, sorted(alignment_heads(model)),
                                names=("Whisper decode step", "window")) if settings.static_step else None
    runner = WhisperRunner(model, cache, WhisperLogitRules(tokens, rules), static, settings.min_rows)
    return engine(runner, scheduler, tokenizer, frozenset({tokens.end_of_text}), settings)


def pooling_engine(model: PreTrainedModel, tokenizer: Decoder, pooling: Pooling, max_length: int,
                   settings: EngineSettings) -> Engine:
    """An embedding model's engine: up to a batch of whole prompts per step (never cut into chunks: an encoder
    attends both ways), pooled, nothing kept after."""
    batch_size = settings.batch_size
    scheduler = Scheduler(PromptsOnly(max_length), max_running=batch_size, max_pending=settings.max_pending,
                          step_tokens=batch_size * max_length)
    logger.info("embeddings: %s pooling%s, up to %d inputs of at most %d tokens per forward", pooling.mode,
                ", normalised" if pooling.normalize else "", batch_size, max_length)
    return engine(PoolingRunner(model, pooling), scheduler, tokenizer, frozenset(), settings)


def engine(runner: ModelRunner | EncoderDecoderRunner | PoolingRunner, scheduler: Scheduler, tokenizer: Decoder,
           eos_token_ids: frozenset[int], settings: EngineSettings) -> Engine:
    """The engine loop over the runner, with what every engine takes: profiling, the step timeout, failpoints."""
    profiler = StepProfiler(settings.profile_dir, settings.profile_steps) if settings.profile_dir else None
    failpoints = Failpoints(list(settings.failpoints)) if settings.failpoints else None
    return Engine(runner, scheduler, tokenizer, eos_token_ids, settings.microsleep, profiler=profiler,
                  step_timeout=settings.step_timeout, failpoints=failpoints)


def static_row_decoder(family: Seq2SeqFamily, cache: EncoderDecoderRows, model: PreTrainedModel,
                       settings: EngineSettings, alignment_layers: list[int] | None = None,
                       names: tuple[str, str] = ("encoder-decoder decode step", "sequence")) -> StaticRowDecoder:
    """An encoder-decoder's whole cache allocated now, and its static-shape decode step; see StaticRowDecoder."""
    size = cache.allocate(family.layers, family.heads, family.head_dim, model.dtype, model.device)
    logger.info("static cache: %.1f MiB for %d %ss of %d decoder positions%s and their %d encoder positions",
                size / 2**20, cache.max_rows, names[1], cache.self_attention.max_length,
                f" ({cache.beams} beams each)" if cache.beams > 1 else "", cache.cross.max_length)
    return StaticRowDecoder(family, cache, model.device, alignment_layers, settings.compile_mode, settings.min_rows,
                            names, settings.saved_steps)


def free_memory_bytes(device: torch.device) -> int:
    """What the device has free now: CUDA's free memory, or the kernel's MemAvailable on CPU."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def kv_budget_tokens(memory: int | float | None, layout: KVLayout, useful_tokens: int) -> int:
    """How many tokens' K/V the budget holds, never more than `useful_tokens`. A fraction is of each device's
    free memory, for the layers that keep their K/V there: the fullest device decides."""
    if isinstance(memory, int):
        return min(memory // layout.bytes_per_token, useful_tokens)
    layer_bytes = layout.bytes_per_token // layout.layers
    for device, layers in Counter(layout.devices).items():
        fraction = AUTO_KV_FRACTION[device.type == "cuda"] if memory is None else memory
        affordable = int(free_memory_bytes(device) * fraction) // (layer_bytes * layers)
        useful_tokens = min(useful_tokens, leading_bits(affordable, 4))
    return useful_tokens


def leading_bits(count: int, bits: int) -> int:
    """`count` with all but its `bits` leading binary digits cleared (at most 1/2**(bits-1) less). A budget taken
    from free memory then comes out the same on most starts of a machine, whose free memory moves a little, and so
    does the KV arena's size, which compiled steps hold as a constant: their graphs are found in the on-disk cache
    rather than compiled again."""
    shift = max(count.bit_length() - bits, 0)
    return count >> shift << shift


def drafter(model: PreTrainedModel, speculative: SpeculativeSettings | None) -> Drafter | None:
    if speculative is None:
        return None
    if speculative.draft_model is None:
        logger.info("speculative decoding: n-gram drafts of up to %d tokens (n-grams of %d to %d tokens), verified "
                    "while at most %d sequences are in the engine", speculative.tokens, speculative.lookup_min,
                    speculative.lookup_max, speculative.max_sequences)
        return NgramDrafter(speculative)
    logger.info("speculative decoding: drafts of up to %d tokens from %s (%d parameters), verified while at most %d "
                "sequences are in the engine; the draft's K/V for them outside the KV budget", speculative.tokens,
                speculative.draft_model.name_or_path, speculative.draft_model.num_parameters(),
                speculative.max_sequences)
    return DraftModel(speculative.draft_model, model.get_output_embeddings().out_features)


def attention_cost(model: PreTrainedModel, layout: KVLayout, weights: int) -> float:
    """What attending to one earlier token costs a token, relative to its pass through the linear layers:
    4 x layers x hidden size multiply-adds against 2 per weight outside the embedding table."""
    embedding = model.get_input_embeddings().weight
    return 2 * layout.layers * embedding.shape[1] / max(weights - embedding.numel(), 1)


def static_prompt_tokens(layout: KVLayout, settings: EngineSettings) -> int:
    """How many prompt tokens the static decode step holds beside a full batch: where attend_rows serves the
    attention, the prompt tokens a step may add beside decoding rows, unless they are more than
    STATIC_PROMPT_TOKENS (the static step computes logits for every row, the packed step only where one is
    sampled); none in batch-invariant mode, where a prompt is cut the same way whoever runs beside it."""
    if settings.batch_invariant or settings.step_tokens > STATIC_PROMPT_TOKENS or not rows_attend_anywhere(layout):
        return 0
    return settings.step_tokens
