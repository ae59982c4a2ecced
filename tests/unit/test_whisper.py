"""Whisper serving without the HTTP server: subtitle formatting, the decoding rules against transformers'
own logits processors, long-form segmentation and streaming, the batched runner against
WhisperForConditionalGeneration (a random small model and the embedded tiny.en), and audio decoding."""

import asyncio
import dataclasses
import io
import math
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import av
import numpy as np
import pytest
import torch
from silero_vad import get_speech_timestamps, load_silero_vad
from transformers import (GenerationConfig, GenerationMixin, LlamaConfig, LlamaForCausalLM, WhisperConfig,
                          WhisperForConditionalGeneration)
from transformers.generation.logits_process import (LogitsProcessorList, SuppressTokensLogitsProcessor,
                                                    WhisperTimeStampLogitsProcessor)

from api.audio import render
from batching import Sequence
from batching.detokenizer import IncrementalDetokenizer
from batching.families.whisper_beams import BeamSearch
from batching.families.encoder_decoder_cache import EncoderDecoderRows
from batching.families.whisper_rules import RuleSettings, WhisperLogitRules, WhisperTokens
from batching.families.whisper_runner import SpeechWindow, WhisperRunner, WindowResult
from batching.scheduler import Span
from config import Config
from models import TranscriptionSegment
from serving.errors import APIError
from serving.transcription import Transcript, TranscriptionOptions, TranscriptionService, compression_ratio
from speech.audio import SAMPLE_RATE, AudioDecodeError, decode_audio
from speech.loader import LoadedWhisper, build_whisper_engine, load_whisper
from speech.long_form import StreamedText, is_silent, split_window, window_features
from speech.subtitles import clock, to_srt, to_vtt
from speech.vad import MIN_SILENCE_MS, SPEECH_PAD_MS, THRESHOLD, SpeechDetector, SpeechMap, speech_map
from speech.word_timing import TimedWord, dtw, shorten_words_at_pauses, token_start_times, word_groups
from tests.helpers.engine import WarmUpRecord, finish, greedy, run_with_engine
from tests.helpers.synthetic_speech import SENTENCES, espeak_available, spoken_clip, wav_bytes

# ---------------------------------------------------------------- subtitles and response formats


def segment(index: int, start: float, end: float, text: str) -> TranscriptionSegment:
    return TranscriptionSegment(id=index, seek=0, start=start, end=end, text=text, tokens=[], temperature=0.0,
                                avg_logprob=-0.1, compression_ratio=1.0, no_speech_prob=0.0)


SEGMENTS = [segment(0, 0.0, 1.5, " Hello there."), segment(1, 1.5, 3661.25, " General Kenobi.")]


def test_clock_formats_hours_minutes_seconds_and_milliseconds():
    assert clock(0.0, ",") == "00:00:00,000"
    assert clock(1.5, ",") == "00:00:01,500"
    assert clock(3661.25, ".") == "01:01:01.250"
    assert clock(59.9996, ".") == "00:01:00.000"  # milliseconds round into the next second


def test_srt():
    assert to_srt(SEGMENTS) == ("1\n00:00:00,000 --> 00:00:01,500\nHello there.\n\n"
                                "2\n00:00:01,500 --> 01:01:01,250\nGeneral Kenobi.\n\n")


def test_vtt():
    assert to_vtt(SEGMENTS) == ("WEBVTT\n\n00:00:00.000 --> 00:00:01.500\nHello there.\n\n"
                                "00:00:01.500 --> 01:01:01.250\nGeneral Kenobi.\n\n")


def test_text_and_json_render_the_transcript_without_leading_space():
    transcript = Transcript("transcribe", duration=2.0, language="english", segments=[])
    assert transcript.text == ""
    transcript.segments = SEGMENTS
    assert render(transcript, "text").body == b"Hello there. General Kenobi.\n"
    assert render(transcript, "json").body == b'{"text":"Hello there. General Kenobi.","usage":{"type":"duration",' \
                                              b'"seconds":2.0}}'
    assert b'"segments":[{"id":0,"seek":0,"start":0.0,"end":1.5' in render(transcript, "verbose_json").body


def test_compression_ratio_flags_repetition():
    assert compression_ratio("") == 0.0
    assert compression_ratio("The quick brown fox jumps over the lazy dog.") < 1.5
    assert compression_ratio("I'm sorry. " * 30) > 2.4  # OpenAI's threshold for a failed, looping decode

# ---------------------------------------------------------------- models


@pytest.fixture(scope="session")
def tiny_en() -> LoadedWhisper:
    """The embedded tiny.en, converted once into the cache folder the server uses; in float32, as the transformers
    reference runs (--torch-dtype auto would pick bfloat16 on a CPU with AVX512-BF16 or AMX)."""
    return load_whisper(Config(serving_type="whisper", torch_dtype="float32"))


@pytest.fixture(scope="module")
def random_whisper(tiny_en) -> LoadedWhisper:
    """A random small Whisper with tiny.en's vocabulary, tokenizer, special ids and 30 s windows."""
    torch.manual_seed(0)
    real = tiny_en.model.config
    config = WhisperConfig(vocab_size=real.vocab_size, num_mel_bins=80, d_model=64, encoder_layers=2, decoder_layers=2,
                           encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
                           decoder_ffn_dim=128, max_source_positions=1500, max_target_positions=64,
                           decoder_start_token_id=real.decoder_start_token_id, eos_token_id=real.eos_token_id,
                           pad_token_id=real.pad_token_id, bos_token_id=real.bos_token_id)
    model = WhisperForConditionalGeneration(config).eval()
    for parameter in model.parameters():  # biases and norms start at 0/1: make every value distinctive
        torch.nn.init.normal_(parameter.data, std=0.3)
    model.generation_config.alignment_heads = [[1, 0], [1, 2]]  # word timing needs some
    return LoadedWhisper(model, tiny_en.processor, "random", tiny_en.tokens, tiny_en.rules)


def frames(loaded: LoadedWhisper) -> int:
    return 2 * loaded.model.config.max_source_positions


def window_sequence(loaded: LoadedWhisper, prompt: list[int], features: torch.Tensor, row: int = -1,
                    audio_positions: int | None = None) -> Sequence:
    inputs = dataclasses.replace(window(loaded, prompt, features), audio_positions=audio_positions)
    seq = Sequence(prompt, greedy(16), IncrementalDetokenizer(loaded.processor.tokenizer, prompt),
                   frozenset({loaded.tokens.end_of_text}), inputs=inputs)
    seq.row = row
    return seq


def window(loaded: LoadedWhisper, prompt: list[int], features: torch.Tensor) -> SpeechWindow:
    return SpeechWindow(features, start_index=prompt.index(loaded.tokens.start_of_transcript))


def prompts(loaded: LoadedWhisper) -> list[list[int]]:
    """Windows with no previous text, a short and a longer previous text."""
    sot, previous = loaded.tokens.start_of_transcript, loaded.tokens.start_of_previous
    return [[sot], [previous, 383, 2068, 7586, sot], [previous, *range(400, 420), sot]]


def runner_for(loaded: LoadedWhisper, rows: int = 4) -> WhisperRunner:
    cache = EncoderDecoderRows(rows, loaded.model.config.max_target_positions,
                               loaded.model.config.max_source_positions)
    return WhisperRunner(loaded.model, cache, WhisperLogitRules(loaded.tokens, loaded.rules))


def assert_logits_match_transformers(loaded: LoadedWhisper, features: torch.Tensor, steps: int) -> None:
    """Prefill several windows together, then decode them together; every row's logits at every step equal
    the full transformers forward over the same tokens."""
    model = loaded.model
    runner = runner_for(loaded)
    seqs = [window_sequence(loaded, prompt, f, row) for row, (prompt, f) in enumerate(zip(prompts(loaded), features))]
    with torch.inference_mode():
        encoded = [model.get_encoder()(f[None]) for f in features]
        logits = runner.logits(seqs, [])
        for _ in range(steps):
            for seq, row_logits, encoder_outputs in zip(seqs, logits, encoded):
                ids = torch.tensor([seq.prompt_ids + seq.output_ids])
                expected = model(encoder_outputs=encoder_outputs, decoder_input_ids=ids).logits[0, -1]
                torch.testing.assert_close(row_logits, expected, atol=1e-4, rtol=0)
            for seq, row_logits in zip(seqs, logits):
                seq.output_ids.append(int(row_logits.argmax()))
            logits = runner.logits([], seqs)


def test_runner_matches_transformers_on_a_random_whisper(random_whisper):
    torch.manual_seed(1)
    assert_logits_match_transformers(random_whisper, torch.randn(3, 80, frames(random_whisper)), steps=6)


def test_runner_matches_transformers_on_tiny_en(tiny_en):
    torch.manual_seed(2)
    assert_logits_match_transformers(tiny_en, torch.randn(3, 80, frames(tiny_en)) * 0.5, steps=3)


def decode_windows(loaded: LoadedWhisper, windows: list[tuple[list[int], torch.Tensor, int]],
                   batch_size: int = 8, beams: int = 1, audio_positions: int | None = None, **flags
                   ) -> list[tuple[Sequence, WindowResult]]:
    """Run (prompt, features, max_tokens) windows through the real engine at once; they finish at different
    steps, so rows are freed and refilled by moving the last row (with its cross-attention K/V). Each window's
    sequence, and what its last delta reports."""
    async def body(engine):
        seqs = [engine.add(prompt, greedy(limit), inputs=dataclasses.replace(
                    window(loaded, prompt, f), beams=beams, audio_positions=audio_positions))
                for prompt, f, limit in windows]
        return list(await asyncio.gather(*(decoded(engine, s) for s in seqs)))
    config = Config(serving_type="whisper", continuous_batching_batch_size=batch_size, whisper_beam_size=beams,
                    **flags)
    return run_with_engine(lambda: build_whisper_engine(loaded, config), body)


async def decoded(engine, seq: Sequence) -> tuple[Sequence, WindowResult]:
    async for delta in engine.stream(seq):
        assert delta.finish_reason != "error", delta.error
    return seq, delta.window


def test_batched_windows_decode_exactly_as_alone(random_whisper):
    torch.manual_seed(3)
    features = torch.randn(3, 80, frames(random_whisper))
    windows = [(prompt, f, limit) for prompt, f, limit in zip(prompts(random_whisper), features, (5, 30, 12))]
    together = decode_windows(random_whisper, windows)
    alone = [decode_windows(random_whisper, [w])[0] for w in windows]
    assert [s.output_ids for s, _ in together] == [s.output_ids for s, _ in alone]
    assert len({len(s.output_ids) for s, _ in together}) > 1, "windows should finish at different steps"
    for seq, result in together:
        assert seq.output_ids[0] >= random_whisper.tokens.timestamp_begin  # every window starts at a timestamp
        assert seq.cumulative_logprob <= 0 and math.isfinite(seq.cumulative_logprob)
        assert 0 < result.no_speech_prob < 1
        assert result.decoded.tokens == seq.output_ids and result.decoded.logprob == seq.cumulative_logprob


def test_a_full_batch_of_long_prompts_is_admitted_in_one_step_each_whole(tiny_en):
    """Twenty windows carrying the most previous text a prompt holds: one step admits them all, every prompt
    whole (the runner prefills prompts whole; a chunk would be taken for a decoding row)."""
    engine = build_whisper_engine(tiny_en, Config(serving_type="whisper", continuous_batching_batch_size=20))
    service = TranscriptionService(None, tiny_en, ("tiny.en",))
    prompt, _ = service.decoder_prompt(list(range(1000)), "en", "transcribe")
    engine.scheduler.add([window_sequence(tiny_en, prompt, torch.zeros(80, frames(tiny_en))) for _ in range(20)])
    assert [(span.start, span.end) for span in engine.scheduler.plan()] == [(0, len(prompt))] * 20


def test_windows_joining_a_running_batch_decode_as_alone(random_whisper):
    torch.manual_seed(4)
    features = torch.randn(3, 80, frames(random_whisper))
    windows = [(prompt, f, 20) for prompt, f in zip(prompts(random_whisper), features)]

    async def staggered(engine):
        seqs = []
        for prompt, f, limit in windows:
            seqs.append(engine.add(prompt, greedy(limit), inputs=window(random_whisper, prompt, f)))
            while len(seqs[-1].output_ids) < 3:  # the next window joins once this one is decoding
                await asyncio.sleep(0.001)
        return list(await asyncio.gather(*(finish(engine, s) for s in seqs)))
    config = Config(serving_type="whisper", continuous_batching_batch_size=4)
    joined = run_with_engine(lambda: build_whisper_engine(random_whisper, config), staggered)
    alone = [decode_windows(random_whisper, [w])[0][0] for w in windows]
    assert [s.output_ids for s in joined] == [s.output_ids for s in alone]

@pytest.mark.parametrize("beams", [1, 3])
def test_static_cache_decodes_as_the_growing_cache_does(random_whisper, beams):
    """--static-cache: the same tokens (greedy and beam search) and the same word-timing scores as the cache
    that grows, for windows that end at different steps while others run, in a batch of 2 windows that must
    refill its rows."""
    torch.manual_seed(8)
    features = torch.randn(4, 80, frames(random_whisper))
    windows = [(prompt, f, limit) for prompt, f, limit in zip(prompts(random_whisper) * 2, features, (5, 20, 9, 14))]
    growing = decode_windows(random_whisper, windows, batch_size=2, beams=beams, audio_positions=100)
    static = decode_windows(random_whisper, windows, batch_size=2, beams=beams, audio_positions=100,
                            static_cache=True)
    assert [result.decoded.tokens for _, result in static] == [result.decoded.tokens for _, result in growing]
    for (_, ours), (_, theirs) in zip(static, growing):
        assert len(ours.alignment_scores) == len(ours.decoded.tokens)
        for a, b in zip(ours.alignment_scores, theirs.alignment_scores):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_compiled_decode_step_matches_eager_and_never_recompiles_while_serving(random_whisper):
    """--torch-compile: every bucket of windows is compiled during warm-up (its progress reported); then
    windows that join mid-stream, one cancelled, batches of every size, decode the eager engine's tokens
    without one more compilation."""
    torch.manual_seed(9)
    features = torch.randn(5, 80, frames(random_whisper))
    windows = [(prompt, f, limit) for prompt, f, limit in zip(prompts(random_whisper) * 2, features, (6, 18, 3, 12, 9))]
    eager = [seq.output_ids for seq, _ in decode_windows(random_whisper, windows, batch_size=3)]
    warm_up = WarmUpRecord()
    config = Config(serving_type="whisper", continuous_batching_batch_size=3, torch_compile=True)
    build = warm_up.warmed(lambda: build_whisper_engine(random_whisper, config))

    async def varied(engine):
        tasks = []
        for index, (prompt, f, limit) in enumerate(windows):
            seq = engine.add(prompt, greedy(limit), inputs=window(random_whisper, prompt, f))
            tasks.append(asyncio.create_task(finish(engine, seq)))
            if index == 1:
                doomed = engine.add(prompt, greedy(30), inputs=window(random_whisper, prompt, f))
                await asyncio.sleep(0.05)
                engine.cancel(doomed)
            if index % 2 == 0:
                await tasks[-1]
        return [(await task).output_ids for task in tasks]

    served = run_with_engine(build, varied)
    assert warm_up.buckets == [1, 2, 3]
    warm_up.assert_complete_and_never_recompiled()
    assert served == eager


def transformers_beam_search(loaded: LoadedWhisper, generation: GenerationConfig, prompt: list[int],
                             features: torch.Tensor, max_tokens: int, beams: int) -> list[int]:
    """transformers' own beam search (GenerationMixin.generate, num_beams) under the processors our rules
    match (test_rules_match_transformers_processors): the tokens after the prompt."""
    processors = LogitsProcessorList([SuppressTokensLogitsProcessor(generation.suppress_tokens),
                                      WhisperTimeStampLogitsProcessor(generation, begin_index=len(prompt))])
    end_of_text = loaded.tokens.end_of_text
    settings = GenerationConfig(num_beams=beams, do_sample=False, max_new_tokens=max_tokens, length_penalty=1.0,
                                early_stopping=False, eos_token_id=end_of_text, pad_token_id=end_of_text,
                                decoder_start_token_id=loaded.tokens.start_of_transcript)
    with torch.inference_mode():
        output = GenerationMixin.generate(loaded.model, input_features=features[None],
                                          decoder_input_ids=torch.tensor([prompt]), generation_config=settings,
                                          logits_processor=processors)
    tokens = output[0, len(prompt):].tolist()
    return tokens[:tokens.index(end_of_text) + 1] if end_of_text in tokens else tokens


@pytest.mark.parametrize("beams", [2, 5])
def test_beam_search_matches_transformers_generate(tiny_en, beams):
    """tiny.en on spoken windows, decoded together with N beams each (every beam a batch row; one window ends
    at its token limit, two at their end of text, at different steps): each chooses the tokens transformers'
    generate(num_beams=N) chooses for it alone."""
    if not espeak_available():
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng); it synthesises the test speech")
    clips = [spoken_clip(SENTENCES[i:i + count], pause_seconds=0.5) for i, count in ((0, 1), (1, 2), (3, 1))]
    features = [window_features(tiny_en.processor.feature_extractor, decode_audio(clip), 0) for clip in clips]
    prompt = [tiny_en.tokens.start_of_transcript]
    windows = [(prompt, f, limit) for f, limit in zip(features, (100, 100, 12))]
    decodings = decode_windows(tiny_en, windows, beams=beams)
    expected = [transformers_beam_search(tiny_en, tiny_en.model.generation_config, *w, beams) for w in windows]
    assert [result.decoded.tokens for _, result in decodings] == expected
    assert [tokens[-1] == tiny_en.tokens.end_of_text for tokens in expected] == [True, True, False]
    greedy_tokens = [seq.output_ids for seq, _ in decode_windows(tiny_en, windows)]
    assert greedy_tokens != expected, "beam search should choose differently from greedy somewhere"
    for seq, result in decodings:
        assert result.decoded.logprob < 0 and seq.window_decoding.search.done

def test_beam_search_keeps_what_transformers_keeps_when_hypotheses_end_at_many_lengths():
    """A random language model over 12 tokens ends often, at varied lengths, so the length-normalised scores,
    the spare candidates and the early stop all decide: fed the model's log-probabilities of its running beams,
    BeamSearch finds the hypothesis transformers' generate(num_beams=N) returns."""
    config = LlamaConfig(vocab_size=12, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    torch.manual_seed(7)
    model = LlamaForCausalLM(config).eval()
    lengths = set()
    for prompt in ([0, *range(first, first + size)] for first in range(2, 10) for size in (1, 3)):
        for beams in (2, 3, 5):
            with torch.inference_mode():
                output = model.generate(torch.tensor([prompt]), num_beams=beams, do_sample=False, max_new_tokens=10,
                                        length_penalty=1.0, early_stopping=False)[0, len(prompt):].tolist()
                search = BeamSearch(beams, end_of_text=1, max_tokens=10)
                while not search.done:
                    ids = torch.tensor([prompt + beam.tokens for beam in search.running])
                    search.accept(search.propose(model(ids).logits[:, -1].float().log_softmax(dim=-1)))
            expected = output[:output.index(1) + 1] if 1 in output else output
            assert search.best.tokens == expected, (prompt, beams)
            lengths.add(len(expected))
    assert len(lengths) >= 3, lengths

# ---------------------------------------------------------------- the transcription service, in process

ENGLISH, GERMAN = 50258, 50261  # language tokens in tiny.en's vocabulary (an English-only model never uses them)


def multilingual(loaded: LoadedWhisper) -> LoadedWhisper:
    tokens = dataclasses.replace(loaded.tokens, languages={"en": ENGLISH, "de": GERMAN})
    return LoadedWhisper(loaded.model, loaded.processor, loaded.name, tokens, loaded.rules)


def test_decoder_prompts(tiny_en, random_whisper):
    tokens = tiny_en.tokens
    sot, previous = tokens.start_of_transcript, tokens.start_of_previous
    english = TranscriptionService(None, tiny_en, ("tiny.en",))
    assert english.decoder_prompt([], "en", "transcribe") == ([sot], 0)
    assert english.decoder_prompt([11, 12], "en", "transcribe") == ([previous, 11, 12, sot], 3)
    prompt, start = english.decoder_prompt(list(range(1000)), "en", "transcribe")
    assert prompt[1:start] == list(range(1000 - 223, 1000))  # half the decoder's 448 positions, less one
    many = TranscriptionService(None, multilingual(random_whisper), ("random",))
    assert many.decoder_prompt([], "de", "translate") == ([sot, GERMAN, tokens.translate], 0)
    assert many.decoder_prompt([11], "en", "transcribe") == ([previous, 11, sot, ENGLISH, tokens.transcribe], 2)


@pytest.mark.parametrize("multilingual_model, options, param", [
    (False, TranscriptionOptions(task="translate"), "model"),
    (False, TranscriptionOptions(language="de"), "language"),
    (True, TranscriptionOptions(language="xx"), "language"),
])
def test_options_a_model_cannot_serve_are_a_400(random_whisper, multilingual_model, options, param):
    loaded = multilingual(random_whisper) if multilingual_model else random_whisper
    with pytest.raises(APIError) as error:
        TranscriptionService(None, loaded, ("random",)).check_options(options)
    assert (error.value.status, error.value.param) == (400, param)


def test_long_audio_runs_window_after_window_with_language_detection(random_whisper):
    """A random multilingual model on 65 s of tone, the speech detector off (a tone is no speech): whatever it
    emits, the windows advance to the end, the segments stay in order within the audio, and the stream carries
    exactly the transcript's text."""
    loaded = multilingual(random_whisper)
    seconds = np.arange(65 * SAMPLE_RATE) / SAMPLE_RATE
    upload = wav_bytes((3000 * np.sin(2 * np.pi * 300 * seconds)).astype(np.int16), SAMPLE_RATE)

    async def body(engine):
        service = TranscriptionService(engine, loaded, ("random",))
        job = await service.start(upload, TranscriptionOptions(task="translate", vad_filter=False), "test")
        return job, "".join([text async for text in job.deltas()])
    config = Config(serving_type="whisper")
    job, streamed = run_with_engine(lambda: build_whisper_engine(loaded, config), body)
    transcript = job.transcript
    assert transcript.language in ("english", "german")
    assert job.windows >= 3
    assert transcript.duration == pytest.approx(65.0)
    times = [t for s in transcript.segments for t in (s.start, s.end)]
    assert all(0 <= t <= 65.0 for t in times) and times == sorted(times)
    assert streamed == transcript.text

def tone(seconds: float) -> bytes:
    times = np.arange(round(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    return wav_bytes((3000 * np.sin(2 * np.pi * 300 * times)).astype(np.int16), SAMPLE_RATE)


@pytest.mark.parametrize("options, attempts", [
    (TranscriptionOptions(vad_filter=False), 6),
    (TranscriptionOptions(vad_filter=False, temperature=0.4), 1),
    (TranscriptionOptions(vad_filter=False, temperature_fallback=False), 1),  # streamed token by token
])
def test_a_window_that_decodes_badly_is_decoded_again_hotter(random_whisper, options, attempts):
    """A random model's tokens are unlikely (average log-prob far below -1): at temperature 0 its window is
    decoded at 0, 0.2, ... 1.0 in turn and keeps the last; at a set temperature, or streamed, once."""
    async def body(engine):
        service = TranscriptionService(engine, random_whisper, ("random",))
        job = await service.start(tone(5), options, "test")
        return job, "".join([text async for text in job.deltas()])
    job, streamed = run_with_engine(lambda: build_whisper_engine(random_whisper, Config(serving_type="whisper")),
                                    body)
    assert job.windows == attempts
    assert job.transcript.segments and streamed == job.transcript.text
    expected = options.temperature if attempts == 1 else 1.0
    assert all(segment.temperature == expected for segment in job.transcript.segments)
    assert all(segment.avg_logprob < -1 for segment in job.transcript.segments)


# ---------------------------------------------------------------- decoding rules


def test_rules_match_transformers_processors(tiny_en):
    tokens, generation = tiny_en.tokens, tiny_en.model.generation_config
    rules = WhisperLogitRules(tokens, tiny_en.rules)
    prompt = [tokens.start_of_previous, 383, tokens.start_of_transcript]
    processors = [SuppressTokensLogitsProcessor(generation.suppress_tokens),
                  WhisperTimeStampLogitsProcessor(generation, begin_index=len(prompt))]
    t = tokens.timestamp_begin
    histories = [[], [t + 3], [t + 3, 400], [t + 3, 400, t + 20], [t + 3, 400, t + 20, t + 20],
                 [t + 3, 400, t + 20, t + 25, 500, 600], [t + 3, 400, t + 20, t + 25, 500]]
    torch.manual_seed(5)
    logits = torch.randn(len(histories), len(tiny_en.processor.tokenizer)) * 3
    logits[-1, t:] += 8  # together the timestamps outweigh every text token: a timestamp is forced
    ruled = rules.apply(logits.clone(), histories)
    for row, history in enumerate(histories):
        expected = logits[row:row + 1].clone()
        for processor in processors:
            expected = processor(torch.tensor([prompt + history]), expected)
        assert torch.equal(ruled[row], expected[0]), f"history {history}"
    assert torch.isinf(ruled[-1, :t]).all()
    assert torch.isinf(ruled[0, :t]).all() and torch.isinf(ruled[0, t + 51:]).all()  # first: a timestamp <= 1 s


def test_language_detection_rows_may_only_choose_a_language():
    tokens = WhisperTokens(end_of_text=0, start_of_transcript=1, no_timestamps=10, languages={"en": 3, "de": 5})
    rules = WhisperLogitRules(tokens, RuleSettings())
    logits = torch.arange(20, dtype=torch.float32).repeat(2, 1)
    ruled = rules.apply(logits, [[], []], detecting_language=[True, False])
    assert torch.isfinite(ruled[0]).nonzero().flatten().tolist() == [3, 5]
    assert torch.isfinite(ruled[1]).nonzero().flatten().tolist() == list(range(11, 20))

# ---------------------------------------------------------------- long-form segmentation and streaming

T = 100  # the first timestamp id in these made-up windows; each step is 0.02 s


def seconds(parts):
    return [(part.start, part.end) for part in parts]


def test_complete_segments_advance_a_whole_window():
    parts, advance = split_window([T, 5, 6, T + 50, T + 50, 7, T + 100], T, 3000, final=False)
    assert seconds(parts) == [(0.0, 1.0), (1.0, 2.0)]
    assert [p.tokens for p in parts] == [[T, 5, 6, T + 50], [T + 50, 7, T + 100]]
    assert advance == 3000


def test_an_unfinished_segment_is_decoded_again_by_the_next_window():
    parts, advance = split_window([T, 5, T + 50, T + 60, 7, 8], T, 3000, final=False)
    assert seconds(parts) == [(0.0, 1.0)]
    assert advance == 100  # frames: the next window starts where the last complete segment ended


def test_the_final_window_keeps_its_unfinished_segment():
    parts, advance = split_window([T, 5, T + 50, T + 60, 7, 8], T, 1234, final=True)
    assert seconds(parts) == [(0.0, 1.0), (1.2, 12.34)]
    assert advance == 1234


def test_windows_without_timestamp_pairs_are_one_segment():
    assert seconds(split_window([T + 10, 5, 6], T, 3000, final=False)[0]) == [(0.2, 30.0)]
    assert seconds(split_window([T + 10, 5, T + 60], T, 3000, final=False)[0]) == [(0.2, 1.2)]
    assert split_window([T + 10], T, 3000, final=False) == ([], 3000)  # no text, no segment
    assert split_window([], T, 3000, final=True) == ([], 3000)


def streamed(tiny_en, tokens: list[int], final: bool, no_speech_prob: float = 0.0, avg_logprob: float = 0.0
             ) -> tuple[list[str], str]:
    """What a gate releases token by token, and what it releases at the end, given the text the transcript keeps
    (its segments' text, as TranscriptionJob builds it)."""
    decode = TranscriptionService(None, tiny_en, ("tiny.en",)).text_of
    gate = StreamedText(decode, tiny_en.tokens.timestamp_begin, final)
    released = [gate.feed([token], no_speech_prob) for token in tokens]
    kept = "".join(decode(part.tokens) for part in split_window(tokens, tiny_en.tokens.timestamp_begin, 3000, final)[0])
    return released, gate.finish("" if is_silent(no_speech_prob, avg_logprob) else kept)


def test_streamed_text_waits_for_segments_to_close_in_earlier_windows(tiny_en):
    t = tiny_en.tokens.timestamp_begin
    a, b, c = (tiny_en.processor.tokenizer.encode(word, add_special_tokens=False)[0] for word in (" a", " b", " c"))
    released, rest = streamed(tiny_en, [t, a, t + 50, t + 50, b, t + 80, t + 80, c], final=False)
    assert released == ["", " a", "", "", "", "", " b", ""]
    assert rest == ""  # " c" never closed: the next window decodes it again
    # a lone timestamp inside a segment closes nothing: the transcript cuts at the last pair
    released, rest = streamed(tiny_en, [t, a, t + 50, t + 50, b, t + 80, c], final=False)
    assert "".join(released) + rest == " a"


def test_streamed_text_flows_at_once_in_the_final_window(tiny_en):
    t = tiny_en.tokens.timestamp_begin
    a, b, c = (tiny_en.processor.tokenizer.encode(word, add_special_tokens=False)[0] for word in (" a", " b", " c"))
    released, rest = streamed(tiny_en, [t, a, t + 50, t + 50, b, t + 80, t + 80, c], final=True)
    assert released == ["", " a", "", "", " b", "", "", " c"]
    assert rest == ""


def test_a_window_that_may_be_silent_holds_its_text_to_the_end(tiny_en):
    t = tiny_en.tokens.timestamp_begin
    a, b = (tiny_en.processor.tokenizer.encode(word, add_special_tokens=False)[0] for word in (" a", " b"))
    tokens = [t, a, t + 50, t + 50, b]
    released, rest = streamed(tiny_en, tokens, final=True, no_speech_prob=0.9, avg_logprob=-0.2)
    assert released == [""] * len(tokens)
    assert rest == " a b"  # confident tokens: it was speech after all
    released, rest = streamed(tiny_en, tokens, final=True, no_speech_prob=0.9, avg_logprob=-2.0)
    assert "".join(released) + rest == ""


def test_streamed_text_is_always_what_the_transcript_keeps(tiny_en):
    """Random windows of words, characters split over several byte tokens, lone timestamps and pairs: what
    streams out is at every step the start of the text the transcript keeps, and all of it in the end."""
    t = tiny_en.tokens.timestamp_begin
    encode = tiny_en.processor.tokenizer.encode
    pieces = [encode(text, add_special_tokens=False) for text in (" the", " fox", " 狐", "ü", " 😀")]
    assert max(len(piece) for piece in pieces) > 1  # some characters take more than one token
    rng = np.random.default_rng(0)
    for _ in range(300):
        tokens = [t]
        for _ in range(rng.integers(1, 12)):
            tokens += [t + int(rng.integers(1, 1500))] if rng.random() < 0.3 else list(pieces[rng.integers(5)])
        final = bool(rng.random() < 0.3)
        released, rest = streamed(tiny_en, tokens, final)
        kept = "".join(released) + rest
        expected = "".join(tiny_en.processor.tokenizer.decode(part.tokens, skip_special_tokens=True)
                           for part in split_window(tokens, t, 3000, final)[0])
        assert kept == expected, tokens
        assert "\ufffd" not in "".join(released), tokens

# ---------------------------------------------------------------- audio decoding


def encoded_tone(container: str, codec: str, rate: int, seconds: float = 2.0) -> bytes:
    """A 440 Hz stereo tone at `rate`, encoded by PyAV's FFmpeg."""
    t = np.arange(int(rate * seconds)) / rate
    tone = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format=container) as output:
        stream = output.add_stream(codec, rate=rate, layout="stereo")
        frame = av.AudioFrame.from_ndarray(np.stack([tone, tone]), format="fltp", layout="stereo")
        frame.sample_rate = rate
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            output.mux(packet)
    return buffer.getvalue()


@pytest.mark.parametrize("container, codec, rate", [
    ("wav", "pcm_s16le", 44100), ("flac", "flac", 22050), ("mp3", "libmp3lame", 44100), ("ogg", "libopus", 48000),
    ("webm", "libopus", 48000), ("ipod", "aac", 44100),  # ipod is FFmpeg's name for .m4a
])
def test_decodes_common_containers_to_16k_mono(container, codec, rate):
    samples = decode_audio(encoded_tone(container, codec, rate))
    assert samples.dtype == np.float32 and samples.ndim == 1
    assert len(samples) / SAMPLE_RATE == pytest.approx(2.0, abs=0.06)  # encoders may pad a frame
    peak_hz = np.argmax(np.abs(np.fft.rfft(samples))) * SAMPLE_RATE / len(samples)
    assert peak_hz == pytest.approx(440, abs=2)
    rms = np.sqrt(np.mean(samples[1000:-1000] ** 2))
    # FFmpeg's downmix, as `ffmpeg -ac 1` (OpenAI's loader) does it: each channel at -3 dB, so the sum of two
    # equal channels has sqrt(2) times a channel's RMS (0.3 / sqrt(2))
    assert rms == pytest.approx(0.3, rel=0.05)


@pytest.mark.parametrize("data, message", [
    (b"", "empty"),
    (b"This is a text file, not a recording.\n" * 50, "not audio"),
    (bytes(range(256)) * 40, "not audio"),
])
def test_rejects_what_is_not_audio(data, message):
    with pytest.raises(AudioDecodeError, match=message):
        decode_audio(data)


def test_rejects_a_corrupt_file():
    wav = encoded_tone("wav", "pcm_s16le", 16000)
    with pytest.raises(AudioDecodeError, match="corrupt|not audio"):
        decode_audio(wav[:60])  # a header that promises audio, then nothing


def test_speech_map_joins_the_chunks_and_maps_times_back():
    audio = np.arange(10 * SAMPLE_RATE, dtype=np.float32)
    speech = SpeechMap(((1 * SAMPLE_RATE, 3 * SAMPLE_RATE), (6 * SAMPLE_RATE, 7 * SAMPLE_RATE)))
    compact = speech.compact(audio)
    assert len(compact) == 3 * SAMPLE_RATE and compact[0] == SAMPLE_RATE and compact[2 * SAMPLE_RATE] == 6 * SAMPLE_RATE
    assert speech.original_seconds(0.5) == 1.5
    assert speech.original_seconds(2.0) == 6.0  # a start on the seam starts the second chunk...
    assert speech.original_seconds(2.0, is_end=True) == 3.0  # ...an end on it ends the first
    assert speech.original_seconds(2.5, is_end=True) == 6.5
    assert speech.original_seconds(9.0, is_end=True) == 7.0  # never past the speech
    assert len(SpeechMap(()).compact(audio)) == 0


def detected(detector: SpeechDetector, audio: np.ndarray) -> SpeechMap:
    return speech_map(detector.scores(audio).result(), len(audio))


def test_uploads_scored_at_once_get_the_speech_map_each_gets_alone():
    if not espeak_available():
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng); it synthesises the test speech")
    speech = decode_audio(spoken_clip(SENTENCES[:2], pause_seconds=3.0))
    uploads = [speech, np.zeros(5 * SAMPLE_RATE, dtype=np.float32), speech[::-1].copy()]
    detector = SpeechDetector()
    alone = [detected(detector, audio) for audio in uploads]
    with ThreadPoolExecutor(len(uploads)) as pool:
        assert list(pool.map(lambda audio: detected(detector, audio), uploads)) == alone
    assert len(alone[0].chunks) == 2 and alone[1].chunks == ()  # two sentences 3 s apart; silence
    silero = [get_speech_timestamps(torch.from_numpy(audio), load_silero_vad(onnx=True), threshold=THRESHOLD,
                                    min_silence_duration_ms=MIN_SILENCE_MS, speech_pad_ms=SPEECH_PAD_MS)
              for audio in uploads]
    assert alone == [SpeechMap(tuple((span["start"], span["end"]) for span in found)) for found in silero]


def test_a_cancelled_upload_stops_being_scored_and_the_others_go_on():
    detector = SpeechDetector()
    ten_minutes = detector.scores(np.zeros(600 * SAMPLE_RATE, dtype=np.float32))
    assert ten_minutes.cancel()
    second = np.zeros(SAMPLE_RATE, dtype=np.float32)  # 32 chunks of 512 samples (the last one short)
    assert detected(detector, second).chunks == ()
    before = detector.chunks_scored
    assert detected(detector, second).chunks == ()
    assert detector.chunks_scored - before == 32, "only the second's chunks: none of the cancelled upload's"


def test_importing_the_server_leaves_torch_its_threads():
    """silero_vad's import calls torch.set_num_threads(1) for the whole process; every model would then run on
    one core."""
    check = "import torch; threads = torch.get_num_threads(); import app; assert torch.get_num_threads() == threads"
    subprocess.run([sys.executable, "-c", check], check=True, env={**os.environ, "OMP_NUM_THREADS": "2"})


def test_the_speech_detector_hears_no_speech_in_silence_or_hum():
    seconds = np.arange(5 * SAMPLE_RATE, dtype=np.float32) / SAMPLE_RATE
    hum = 0.05 * np.sin(2 * np.pi * 50 * seconds).astype(np.float32)
    detector = SpeechDetector()
    assert detected(detector, np.zeros(5 * SAMPLE_RATE, dtype=np.float32)).chunks == ()
    assert detected(detector, hum).chunks == ()


# ---------------------------------------------------------------- word timestamps

def test_alignment_scores_are_the_cross_attention_transformers_computes(tiny_en):
    """For every token a window chooses, the runner keeps the alignment heads' scores of the query that chose
    it; their softmax is transformers' own cross-attention of those heads at that position."""
    model, heads = tiny_en.model, tiny_en.model.generation_config.alignment_heads
    torch.manual_seed(3)
    features = torch.randn(2, 80, frames(tiny_en)) * 0.5
    runner = runner_for(tiny_en)
    seqs = [window_sequence(tiny_en, prompt, f, row, audio_positions=model.config.max_source_positions)
            for row, (prompt, f) in enumerate(zip(prompts(tiny_en), features))]
    spans = [Span(seq, 0, len(seq.prompt_ids)) for seq in seqs]
    for _ in range(4):
        for seq, (token,) in zip(seqs, runner.step(spans)):
            seq.output_ids.append(token.token_id)
        spans = [Span(seq, seq.length - 1, seq.length) for seq in seqs]
    served = model.config._attn_implementation
    model.set_attn_implementation("eager")  # the implementation that returns attention weights
    try:
        for seq, f in zip(seqs, features):
            assert len(seq.window_decoding.alignment_scores) == len(seq.output_ids)
            ids = torch.tensor([seq.prompt_ids + seq.output_ids])
            with torch.inference_mode():
                output = model(input_features=f[None], decoder_input_ids=ids, output_attentions=True)
            attentions = output.cross_attentions
            for step, scores in enumerate(seq.window_decoding.alignment_scores):
                position = len(seq.prompt_ids) - 1 + step
                expected = torch.stack([attentions[layer][0, head, position] for layer, head in heads])
                torch.testing.assert_close(scores.softmax(dim=-1), expected, atol=1e-4, rtol=0)
    finally:
        model.set_attn_implementation(served)


def test_dtw_follows_the_cheapest_monotonic_path():
    cost = np.ones((3, 6))
    for token, positions in enumerate([(0, 1), (2, 3, 4), (5,)]):
        cost[token, list(positions)] = 0
    tokens, positions = dtw(cost)
    assert tokens.tolist() == [0, 0, 1, 1, 1, 2] and positions.tolist() == [0, 1, 2, 3, 4, 5]


def test_words_start_where_their_tokens_are_heard():
    """Three tokens each attended sharply over a known stretch of 20 ms positions, then the closing token."""
    stretches = [(10, 30), (30, 45), (45, 80), (80, 100)]
    scores = torch.full((2, len(stretches), 100), -5.0)
    for token, (first, last) in enumerate(stretches):
        scores[:, token, first:last] = 5.0
    starts = token_start_times(scores)
    assert np.allclose(starts[1:], [0.6, 0.9, 1.6], atol=0.06)  # the path starts at 0 s, whatever is heard there


def test_words_group_tokens_at_spaces_and_keep_punctuation():
    pieces = {1: " Hello", 2: ",", 3: " wor", 4: "ld", 5: "."}
    decode = lambda ids: "".join(pieces[i] for i in ids)  # noqa: E731
    assert word_groups([1, 2, 3, 4, 5], decode, "en") == [[0, 1], [2, 3, 4]]
    assert word_groups([1, 3, 4], decode, "ja") == [[0], [1], [2]]
    halves = {1: b"\xe4\xb8", 2: b"\x96", 3: b"\xe7\x95", 4: b"\x8c"}  # 世 and 界, each cut in two tokens
    decode_bytes = lambda ids: b"".join(halves[i] for i in ids).decode("utf-8", errors="replace")  # noqa: E731
    assert word_groups([1, 2, 3, 4], decode_bytes, "zh") == [[0, 1], [2, 3]]


def test_a_word_swallowing_a_pause_is_cut_to_twice_the_median_word():
    words = [TimedWord(" Hi", 0.0, 5.0, 0), TimedWord(" there", 5.0, 5.4, 1), TimedWord(" you", 5.4, 5.8, 2),
             TimedWord(" all.", 5.8, 9.0, 3)]
    shorten_words_at_pauses(words)
    longest = 2 * 0.7  # twice the median word (2.4 s here), capped at twice 0.7 s
    times = [t for w in words for t in (w.start, w.end)]
    assert times == pytest.approx([5.0 - longest, 5.0, 5.0, 5.4, 5.4, 5.8, 5.8, 5.8 + longest])
