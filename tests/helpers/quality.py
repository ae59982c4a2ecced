"""The quality matrix's parts: a tiny random model of every family the server serves, saved as a checkpoint that
the server's own loaders read; the requests each family serves at once (different lengths, one joining late
beside decoding rows with its prompt chunked, one reusing a finished request's prefix); transformers' own forward
over the same tokens as the reference; the bound a configuration's answers must keep; and the serving modes'
combinations, generated from the flags config.py marks as modes."""

from __future__ import annotations

import asyncio
import itertools
import math
import random
import re
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import transformers
from PIL import Image
from transformers.generation.logits_process import SuppressTokensLogitsProcessor, WhisperTimeStampLogitsProcessor

from batching import Engine, SamplingParams, Sequence
from batching.families import TEXT_FAMILIES
from batching.families.encoder_decoder import TextInput
from batching.families.whisper_runner import SpeechWindow
from batching.vision import FEATURES as VISION_FAMILIES
from batching.vision import ImageInputs, image_inputs
from config import Config, ConfigError
from converters.hqq import quantize_linears
from converters.int8 import quantize_int8
from model_manager import build_engine, load_model
from speech.loader import build_whisper_engine, load_whisper
from tests.helpers.tiny_models import (byte_tokenizer, save_vision_processor, tiny_model, tiny_seq2seq,
                                       tiny_vision_model)

BATCH = 4
# what the server accepts: any decoder, the encoder-decoder and vision families the engine has runners for, Whisper
SERVED_FAMILIES = ("decoder", *TEXT_FAMILIES, "whisper", *VISION_FAMILIES)


# ---------------------------------------------------------------- the modes, from the configuration


def serving_modes() -> dict[str, tuple]:
    """Each flag config.py marks as a serving mode, with the values the matrix serves it at (its default first)."""
    return {f.name: f.metadata["modes"] for f in fields(Config) if f.metadata.get("modes")}


def refusal(settings: dict[str, Any], device: str = "cpu") -> str | None:
    """Why the server refuses to start with these settings (on a model given by --hf-model), or None."""
    try:
        Config(accelerator_type=device, **{"hf_model": "a-checkpoint", **settings}).validate()
    except ConfigError as error:
        return str(error)
    return None


def covering_rows(modes: dict[str, tuple], refused: Callable[[dict[str, Any]], str | None]
                  ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The defaults, each mode alone at each of its other values, then combinations that serve every value of every
    mode beside every value of every other mode at least once (pairwise coverage, greedily); and, for each pair of
    values no accepted combination holds, the smallest combination that holds it: the server must refuse those at
    start-up."""
    names = list(modes)
    candidates = [dict(zip(names, values)) for values in itertools.product(*modes.values())]
    accepted = [row for row in candidates if refused(row) is None]
    wanted = {pair for row in accepted for pair in pairs(row)}
    defaults = candidates[0]
    alone = [{**defaults, name: value} for name, values in modes.items() for value in values[1:]]
    rows = [defaults, *(row for row in alone if refused(row) is None)]
    uncovered = wanted - set().union(*map(pairs, rows))
    while uncovered:
        best = max(accepted, key=lambda row: len(pairs(row) & uncovered))
        rows.append(best)
        uncovered -= pairs(best)
    never = {pair for row in candidates for pair in pairs(row)} - wanted
    refused_rows = [{**defaults, **dict(pair)} for pair in sorted(never, key=repr)]
    return rows, refused_rows


def pairs(row: dict[str, Any]) -> set[tuple[tuple[str, Any], tuple[str, Any]]]:
    return set(itertools.combinations(sorted(row.items(), key=lambda item: item[0]), 2))


def row_name(row: dict[str, Any], defaults: dict[str, Any]) -> str:
    changed = [f"{name}={value}" for name, value in row.items() if value != defaults[name]]
    return ",".join(changed) or "defaults"


# ---------------------------------------------------------------- the bound


@dataclass(frozen=True)
class Bound:
    """How far a served token may stand from transformers' choice after the same prefix: `gap` is the reference's
    best log-probability less its log-probability of the served token (0 when the engine chose the reference's
    argmax), `logprob` the difference between the engine's log-probability of its token and the reference's. In
    half precision each position may add twice what transformers' own half precision moves a log-probability there
    from float32 (a random tiny model amplifies roundings: some move by nats where others move by hundredths)."""
    gap: float
    logprob: float


# float32: the same arithmetic up to summation order, so the same tokens but for exact ties; half precision: each
# side rounds every layer's output to 8 (bfloat16) or 11 (float16) bits, in its own order; quantised layers: an
# activation a float32 ulp either side of an int8 rounding step moves by a whole step (1/127 of its row's largest):
# seen to move a tiny T5's log-probability by 0.08 nats, served alone or batched
BOUNDS = {torch.float32: Bound(gap=1e-3, logprob=1e-3), torch.bfloat16: Bound(gap=0.25, logprob=0.25),
          torch.float16: Bound(gap=0.05, logprob=0.05)}
QUANTISED = Bound(gap=0.25, logprob=0.25)


def bound(config: Config) -> Bound:
    """The bound of a configuration: its dtype's, or the quantised layers', whichever is looser."""
    dtype = BOUNDS[config.dtype]
    return QUANTISED if (config.int8 or config.hqq) and QUANTISED.gap > dtype.gap else dtype
LOWEST_LOGPROB = -50.0  # below it, tokens count as ruled out (Whisper's rules rule out some with -inf)


@dataclass
class Served:
    tokens: list[int]
    logprobs: list[float]


def divergence(served: Served, reference: torch.Tensor, bound: Bound, float32_reference: torch.Tensor) -> str | None:
    """What breaks the bound (the first token that does), or None. `reference`: [tokens, vocab] log-probabilities
    transformers gives each served token's position in the configuration's dtype, teacher-forced on the served
    tokens; `float32_reference` the same in float32."""
    reference, float32_reference = reference.clamp(min=LOWEST_LOGPROB), float32_reference.clamp(min=LOWEST_LOGPROB)
    slack = 2 * (reference - float32_reference).abs().amax(dim=-1)
    for index, (token, logprob) in enumerate(zip(served.tokens, served.logprobs)):
        best, theirs, extra = reference[index].max().item(), reference[index, token].item(), slack[index].item()
        if (best - theirs > bound.gap + extra or abs(max(logprob, LOWEST_LOGPROB) - theirs) > bound.logprob + extra
                or not math.isfinite(logprob)):
            return (f"token {index} ({token}): transformers prefers {int(reference[index].argmax())} by "
                    f"{best - theirs:.4f} nats (bound {bound.gap} + {extra:.4f}); logprob {logprob:.4f} against "
                    f"transformers' {theirs:.4f} (bound {bound.logprob} + {extra:.4f}); served {served.tokens}")
    return None


# ---------------------------------------------------------------- requests and serving


@dataclass
class Request:
    prompt: list[int]
    max_tokens: int
    inputs: Any = None  # what the runner takes beyond token ids: encoder input, images, a speech window
    reference_inputs: dict[str, torch.Tensor] = field(default_factory=dict)  # ...and transformers' forward
    joins_after: int | None = None  # added once request [index] has finished, beside the others decoding


# Every family's four requests: the second ends first, and the fourth joins then, beside the two still decoding.
MAX_TOKENS, LATE, JOINS_AFTER = (14, 3, 12, 10), 3, 1
DECODER_SLOT = 40  # two of decoder_requests' four fit a static slot, the other two run as long rows


def scheduled(parts: list[tuple[list[int], Any, dict[str, torch.Tensor]]]) -> list[Request]:
    """Four (prompt, runner inputs, reference inputs) as the matrix serves them."""
    return [Request(prompt, limit, inputs, reference, JOINS_AFTER if index == LATE else None)
            for index, ((prompt, inputs, reference), limit) in enumerate(zip(parts, MAX_TOKENS, strict=True))]


def collect(engine: Engine, seq: Sequence) -> "asyncio.Future[Served]":
    async def run() -> Served:
        served = Served([], [])
        async for delta in engine.stream(seq):
            if delta.finish_reason == "error":
                raise AssertionError(f"the engine failed the request: {delta.error}")
            served.tokens.extend(delta.token_ids)
            served.logprobs.extend(token.logprob for token in delta.logprobs)
        return served
    return asyncio.ensure_future(run())


def params(request: Request) -> SamplingParams:
    return SamplingParams(max_tokens=request.max_tokens, temperature=0.0, logprobs=0)


async def serve_together(engine: Engine, requests: list[Request]) -> list[Served]:
    """The requests at once, but for those that join when another has finished (the others still decoding)."""
    tasks: dict[int, asyncio.Future[Served]] = {}
    for index, request in enumerate(requests):
        if request.joins_after is not None:
            await tasks[request.joins_after]
            assert any(not task.done() for task in tasks.values()), "a late request should join decoding rows"
        tasks[index] = collect(engine, engine.add(request.prompt, params(request), inputs=fresh(request.inputs)))
    return [await tasks[index] for index in range(len(requests))]


async def serve_alone(engine: Engine, requests: list[Request]) -> list[Served]:
    return [await collect(engine, engine.add(r.prompt, params(r), inputs=fresh(r.inputs))) for r in requests]


def fresh(inputs: Any) -> Any:
    """A request's inputs as a new request brings them: what the runner writes on images (features, positions)
    unset."""
    if isinstance(inputs, ImageInputs):
        return replace(inputs, features=None, rope_positions=None, rope_delta=0)
    return inputs


# ---------------------------------------------------------------- the families


def token_run(rng: random.Random, count: int, low: int = 3, high: int = 256) -> list[int]:
    return [rng.randrange(low, high) for _ in range(count)]


@dataclass
class Family:
    """One family the server serves: how its tiny checkpoint is made, which flags select it, how the server loads
    and serves it, what it is asked, and how transformers scores the answers."""
    name: str
    settings: dict[str, Any]  # Config fields that select the family
    save: Callable[[Path], None]
    requests: Callable[[Any], list[Request]]  # of the loaded model
    reference_logprobs: Callable[[Any, Request, list[int]], torch.Tensor]  # (reference model, request, tokens)
    reference_class: type = transformers.AutoModelForCausalLM
    whisper: bool = False
    # a static cache's rows: an encoder-decoder's as long as the tiny models' context (there they limit requests);
    # a decoder's shorter than some requests, which then run as long rows beside the slots
    static_length: int = 1024

    def config(self, folder: Path, dtype: str, modes: dict[str, Any]) -> Config:
        """The server's configuration."""
        return Config(hf_model=str(folder), torch_dtype=dtype, continuous_batching_batch_size=BATCH,
                      static_cache_decoder_max_length=self.static_length, **self.settings, **modes)

    def load(self, config: Config) -> Any:
        return load_whisper(config) if self.whisper else load_model(config)

    def engine(self, loaded: Any, config: Config) -> Engine:
        engine = build_whisper_engine(loaded, config) if self.whisper else build_engine(loaded, config)
        engine.runner.warm_up(lambda ready, total: None)
        return engine

    def reference(self, folder: Path, config: Config) -> transformers.PreTrainedModel:
        """transformers' own model of the checkpoint, in the configuration's dtype, on its own attention, with the
        configuration's quantisation (so that the matrix judges the engine, not the quantiser)."""
        attention = "eager" if self.name in ("t5", "mt5") else "sdpa"
        model = self.reference_class.from_pretrained(folder, dtype=config.dtype, attn_implementation=attention)
        model.to(config.device).eval()
        if config.int8:
            quantize_int8(model)
        elif config.hqq:
            quantize_linears(model, config.hqq_nbits, config.hqq_group_size)
        return model


def reference_forward(model: transformers.PreTrainedModel, **inputs: Any) -> Any:
    """transformers' forward on the model's device, floating-point inputs in its dtype."""
    def moved(value: Any) -> Any:
        if not isinstance(value, torch.Tensor):
            return value
        return value.to(model.device, model.dtype) if value.is_floating_point() else value.to(model.device)
    with torch.inference_mode():
        return model(**{name: moved(value) for name, value in inputs.items()})


def forward_logprobs(model: transformers.PreTrainedModel, **inputs: Any) -> torch.Tensor:
    return reference_forward(model, **inputs).logits[0].float().cpu().log_softmax(dim=-1)


# decoder


def save_decoder(folder: Path) -> None:
    """A Llama (SmolLM2's architecture) with an untied head: a tied one mostly repeats the last token."""
    tokenizer = byte_tokenizer()
    model = tiny_model("llama", len(tokenizer), seed=11)
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    save_scaled(model, tokenizer, folder)


def save_decoder_with_torch_attention(folder: Path) -> None:
    """A Qwen2 (biased q/k/v) whose 12-wide heads the CPU decode-attention kernel does not take: its attention runs
    the torch paths a GPU runs (packed SDPA, the static step's masked products)."""
    tokenizer = byte_tokenizer()
    torch.manual_seed(12)
    config = transformers.Qwen2Config(vocab_size=len(tokenizer), hidden_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
                                      max_position_embeddings=1024, eos_token_id=2, bos_token_id=1,
                                      tie_word_embeddings=False)
    save_scaled(transformers.AutoModelForCausalLM.from_config(config).eval(), tokenizer, folder)


def save_scaled(model: transformers.PreTrainedModel, tokenizer: Any, folder: Path) -> None:
    scale_weights(model, 4.0)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def scale_weights(model: torch.nn.Module, scale: float) -> None:
    """Larger weights than the initialiser's, so greedy output varies token to token."""
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(scale)


def decoder_requests(loaded: Any) -> list[Request]:
    """Three prompts of different lengths at once; when the shortest answer ends, a long prompt that starts with
    its prompt (whole prefix-cache blocks) joins the two still decoding, its rest cut into chunks beside them."""
    rng = random.Random(5)
    short, shared, longer = token_run(rng, 6), token_run(rng, 40), token_run(rng, 23)
    return scheduled([(prompt, None, {}) for prompt in (short, shared, longer, shared + token_run(rng, 37))])


def decoder_logprobs(model: Any, request: Request, tokens: list[int]) -> torch.Tensor:
    ids = torch.tensor([request.prompt + tokens[:-1]])
    return forward_logprobs(model, input_ids=ids)[len(request.prompt) - 1:]


# encoder-decoder text (T5, mT5, BART)


# tiny_seq2seq scales every weight up so that greedy answers vary; so much that bfloat16's roundings moved a
# log-probability by 17 (BART) to 74 (T5) nats, where a real model's move by hundredths. Scaled back here: the
# weights of the attention scores (q, k, T5's relative bias) and the norms, towards the initialiser's scale (then
# 0.06, 0.14 and 0.11 nats at most over the matrix's requests, with 7 to 16 distinct tokens in their answers).
SEQ2SEQ_RESCALING = {"t5": {r"relative_attention_bias|\.(q|k)\.|layer_norm": 1 / 8, r"shared": 0.5, r"\.wi\.": 1.5},
                     "mt5": {r"relative_attention_bias|\.(q|k)\.|layer_norm": 0.5, r"shared|lm_head": 0.75},
                     "bart": {r"q_proj|k_proj": 0.25, r"layer_norm": 0.5, r"fc1": 2.0}}


def seq2seq_saver(architecture: str) -> Callable[[Path], None]:
    def save(folder: Path) -> None:
        model, tokenizer = tiny_seq2seq(architecture, seed=3)
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                factor = next((f for pattern, f in SEQ2SEQ_RESCALING[architecture].items() if re.search(pattern, name)),
                              1.0)
                parameter.mul_(factor)
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return save


def seq2seq_requests(loaded: Any) -> list[Request]:
    """Encoder inputs of different lengths, each ended by the end-of-sequence token; one joins decoding rows."""
    rng, eos = random.Random(6), loaded.tokenizer.eos_token_id
    inputs = [token_run(rng, length) + [eos] for length in (5, 40, 23, 60)]
    return scheduled([(loaded.decoder_prompt, TextInput(ids), {"input_ids": torch.tensor([ids])}) for ids in inputs])


def seq2seq_logprobs(model: Any, request: Request, tokens: list[int]) -> torch.Tensor:
    decoder_ids = torch.tensor([request.prompt + tokens[:-1]])
    return forward_logprobs(model, **request.reference_inputs, decoder_input_ids=decoder_ids)[len(request.prompt) - 1:]


# Whisper


def save_whisper(folder: Path) -> None:
    """A random small Whisper with tiny.en's vocabulary, processor, generation settings and 30 s windows."""
    tiny_en = load_whisper(Config(serving_type="whisper", torch_dtype="float32"))
    real = tiny_en.model.config
    torch.manual_seed(0)
    config = transformers.WhisperConfig(
        vocab_size=real.vocab_size, num_mel_bins=80, d_model=64, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128,
        max_source_positions=1500, max_target_positions=64, decoder_start_token_id=real.decoder_start_token_id,
        eos_token_id=real.eos_token_id, pad_token_id=real.pad_token_id, bos_token_id=real.bos_token_id)
    model = transformers.WhisperForConditionalGeneration(config).eval()
    for parameter in model.parameters():  # biases and norms start at 0/1: make every value distinctive
        torch.nn.init.normal_(parameter.data, std=0.3)
    model.generation_config = tiny_en.model.generation_config
    model.generation_config.alignment_heads = [[1, 0], [1, 2]]
    model.save_pretrained(folder)
    tiny_en.processor.save_pretrained(folder)


def whisper_requests(loaded: Any) -> list[Request]:
    """Windows of random log-mel frames: with no previous text and with previous text; one joins late."""
    tokens = loaded.tokens
    generator = torch.Generator().manual_seed(4)
    frames = 2 * loaded.model.config.max_source_positions
    prompts = [[tokens.start_of_transcript], [tokens.start_of_previous, 383, 2068, 7586, tokens.start_of_transcript],
               [tokens.start_of_transcript], [tokens.start_of_previous, *range(400, 420), tokens.start_of_transcript]]
    features = [torch.randn(80, frames, generator=generator) for _ in prompts]
    return scheduled([(prompt, SpeechWindow(window, start_index=prompt.index(tokens.start_of_transcript)),
                       {"input_features": window[None]}) for prompt, window in zip(prompts, features)])


def whisper_logprobs(model: Any, request: Request, tokens: list[int]) -> torch.Tensor:
    """transformers' scores under the processors that Whisper's rules match (tests/unit/test_whisper.py), each
    position given the tokens before it."""
    generation = model.generation_config
    suppress = SuppressTokensLogitsProcessor(generation.suppress_tokens)
    timestamps = WhisperTimeStampLogitsProcessor(generation, begin_index=len(request.prompt))
    ids = torch.tensor([request.prompt + tokens[:-1]])
    logits = reference_forward(model, **request.reference_inputs, decoder_input_ids=ids).logits[0].float().cpu()
    rows = []
    for index in range(len(tokens)):
        before = ids[:, :len(request.prompt) + index]
        scores = logits[len(request.prompt) - 1 + index][None]
        rows.append(timestamps(before, suppress(before, scores))[0].log_softmax(dim=-1))
    return torch.stack(rows)


# vision-language


def vision_saver(family: str) -> Callable[[Path], None]:
    def save(folder: Path) -> None:
        model, processor = tiny_vision_model(family, seed=1)
        model.save_pretrained(folder)
        save_vision_processor(processor, folder)
    return save


def picture(seed: int) -> Image.Image:
    return Image.fromarray((np.random.RandomState(seed).rand(40, 50, 3) * 255).astype("uint8"))


def vision_requests(loaded: Any) -> list[Request]:
    """A picture with a question, a text-only prompt, two pictures; a late picture prompt that starts with the
    text-only one's words."""
    rng = random.Random(7)
    words = lambda count: "".join(chr(rng.randrange(97, 123)) for _ in range(count))  # noqa: E731
    shared = words(40)
    asks = [(words(5), [picture(1)]), (shared, []), (words(12), [picture(2), picture(3)]), (shared + words(20),
                                                                                           [picture(4)])]
    parts = []
    for text, images in asks:
        processed = vision_prompt(loaded.processor, text, images)
        inputs = image_inputs(processed, loaded.model.config.image_token_id) if images else None
        parts.append((processed["input_ids"][0].tolist(), inputs, dict(processed)))
    return scheduled(parts)


def vision_prompt(processor: Any, text: str, images: list[Image.Image]) -> dict[str, torch.Tensor]:
    content = [*({"type": "image"} for _ in images), {"type": "text", "text": text}]
    rendered = processor.tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                       add_generation_prompt=True,
                                                       chat_template=processor.chat_template)
    return processor(text=rendered, images=images or None, return_tensors="pt")


def vision_logprobs(model: Any, request: Request, tokens: list[int]) -> torch.Tensor:
    """The prompt with its images, then the served tokens over its cache, as generate runs them: a placeholder token
    the model generated is text, not one more image."""
    inputs = request.reference_inputs
    length, extra = inputs["input_ids"].shape[1], torch.tensor([tokens[:-1]], dtype=torch.long)
    if hasattr(model.model, "rope_deltas"):  # Qwen2-VL keeps the last prompt's; a text-only prompt sets none
        model.model.rope_deltas = None
    prompt = reference_forward(model, **inputs, use_cache=True)
    logits = [prompt.logits[0, -1:]]
    if extra.shape[1]:
        later = {"mm_token_type_ids": torch.zeros_like(extra)} if "mm_token_type_ids" in inputs else {}
        logits.append(reference_forward(model, input_ids=extra, past_key_values=prompt.past_key_values, use_cache=True,
                              cache_position=torch.arange(length, length + extra.shape[1]), **later).logits[0])
    return torch.cat(logits).float().cpu().log_softmax(dim=-1)


def families() -> dict[str, Family]:
    seq2seq = dict(settings={"architecture_type": "encoder-decoder"}, requests=seq2seq_requests,
                   reference_logprobs=seq2seq_logprobs, reference_class=transformers.AutoModelForSeq2SeqLM)
    vision = dict(settings={"model_type": "AutoModelForImageTextToText"}, requests=vision_requests,
                  reference_logprobs=vision_logprobs, reference_class=transformers.AutoModelForImageTextToText,
                  static_length=DECODER_SLOT)
    return {
        "decoder": Family("decoder", {}, save_decoder, decoder_requests, decoder_logprobs,
                          static_length=DECODER_SLOT),
        "decoder-torch-attention": Family("decoder-torch-attention", {}, save_decoder_with_torch_attention,
                                          decoder_requests, decoder_logprobs, static_length=DECODER_SLOT),
        **{name: Family(name, save=seq2seq_saver(name), **seq2seq) for name in TEXT_FAMILIES},
        "whisper": Family("whisper", {"serving_type": "whisper"}, save_whisper, whisper_requests, whisper_logprobs,
                          transformers.WhisperForConditionalGeneration, whisper=True),
        **{name: Family(name, save=vision_saver(name), **vision) for name in VISION_FAMILIES},
    }


def matrix_dtypes(device: str) -> list[str]:
    """Every dtype the device runs: float32 and bfloat16 on every CPU, half precisions on CUDA."""
    return ["float32", "bfloat16"] if device == "cpu" else ["float16", "bfloat16"]

