"""Speech to text on the continuous-batching engine. An upload's audio becomes a chain of 30 s windows, each
decoded as one engine sequence, so windows of many uploads share every decode step; text streams back as
it becomes final, and the windows' segments make the transcript."""

from __future__ import annotations

import asyncio
import logging
import time
import zlib
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Literal, TypeVar

import numpy as np
from transformers.models.whisper.tokenization_whisper import LANGUAGES

from batching import Delta, Engine, QueueFullError, SamplingParams, Sequence
from batching.families.whisper_runner import SpeechWindow, WindowResult
from batching.torch_thread import on_torch_thread
from config import Config
from models import TranscriptionSegment, TranscriptionWord
from serving.errors import APIError, check_error, check_model_name, server_busy
from serving.metrics import Metrics
from serving.startup import StartupProgress, started_engine
from speech.audio import SAMPLE_RATE, AudioDecodeError, decode_audio
from speech.loader import LoadedWhisper, build_whisper_engine, load_whisper
from speech.long_form import (FRAMES_PER_SECOND, StreamedText, decoded_badly, is_silent, split_window,
                              window_features)
from speech.vad import VOICE_MIN_SILENCE_MS, VOICE_PAD_MS, SpeechDetector, SpeechMap, speech_map
from speech.word_timing import TimedWord, align_words

logger = logging.getLogger("batchwise.transcription")
T = TypeVar("T")

MODEL_ALIASES = ("whisper-1",)  # what OpenAI clients send by default
CONDITION_MAX_TEMPERATURE = 0.5  # above it OpenAI stops conditioning a window on the text before it
FALLBACK_TEMPERATURES = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)  # OpenAI's, for a request at temperature 0


@dataclass(frozen=True)
class TranscriptionOptions:
    task: Literal["transcribe", "translate"] = "transcribe"
    language: str | None = None  # an ISO-639-1 code; detected when None on multilingual models
    prompt: str | None = None
    temperature: float = 0.0
    vad_filter: bool = True  # skip what Silero VAD hears as silence
    # at temperature 0, decode a window that reads badly again, hotter: its text is then known only at its end,
    # so a client that streams token by token goes without
    temperature_fallback: bool = True
    word_timestamps: bool = False

    def temperatures(self) -> tuple[float, ...]:
        """The temperatures a window may be decoded at, in turn."""
        return FALLBACK_TEMPERATURES if self.temperature == 0 and self.temperature_fallback else (self.temperature,)


@dataclass
class Transcript:
    task: str
    duration: float
    language: str = ""
    segments: list[TranscriptionSegment] = field(default_factory=list)
    words: list[TranscriptionWord] | None = None  # when word timestamps were asked for

    @property
    def text(self) -> str:
        return "".join(segment.text for segment in self.segments).strip()


def compression_ratio(text: str) -> float:
    raw = text.encode("utf-8")
    return len(raw) / len(zlib.compress(raw)) if raw else 0.0


class TranscriptionService:
    def __init__(self, engine: Engine, loaded: LoadedWhisper, served_names: tuple[str, ...], beams: int = 1) -> None:
        self.engine = engine
        self.beams = beams  # per window decoded at temperature 0
        self.metrics: Metrics | None = None
        self.served_names = served_names
        self.model_name = served_names[0]
        self.multilingual = loaded.multilingual
        self.tokens = loaded.tokens
        self.tokenizer = loaded.processor.tokenizer
        self.feature_extractor = loaded.processor.feature_extractor
        self.context_length = loaded.model.config.max_target_positions  # the decoder's positions
        self.speech_detector = SpeechDetector()
        self.aligns_words = bool(getattr(loaded.model.generation_config, "alignment_heads", None))
        self.seconds: defaultdict[str, float] = defaultdict(float)  # cumulative time per phase, for benchmarks

    def check_model(self, name: str) -> None:
        check_model_name(name, self.served_names, MODEL_ALIASES)

    def kv_tokens(self) -> None:
        """Whisper's cross-attention cache has no token budget to report."""
        return None

    def check_options(self, options: TranscriptionOptions) -> None:
        if options.word_timestamps and not self.aligns_words:
            raise APIError(400, f"{self.model_name} names no alignment heads in its generation config, which word "
                                "timestamps need", param="timestamp_granularities")
        if options.task == "translate" and not self.multilingual:
            raise APIError(400, f"{self.model_name} is an English-only model; translation needs a multilingual "
                                "Whisper model", param="model")
        if options.language is None:
            return
        if not self.multilingual and options.language != "en":
            raise APIError(400, f"{self.model_name} is an English-only model; 'language' can only be 'en'",
                           param="language")
        if self.multilingual and options.language not in self.tokens.languages:
            raise APIError(400, f"Unknown language '{options.language}': use an ISO-639-1 code such as 'en'",
                           param="language")

    async def start(self, data: bytes, options: TranscriptionOptions, request_id: str) -> TranscriptionJob:
        """Decode the upload (400 if it is not usable audio) and prepare its transcription."""
        started = time.perf_counter()
        try:
            audio = await asyncio.to_thread(self._timed, "audio_decode", decode_audio, data)
        except AudioDecodeError as error:
            raise APIError(400, str(error), param="file") from None
        speech = voice = SpeechMap(((0, len(audio)),))
        if options.vad_filter or options.word_timestamps:
            scores = await asyncio.wrap_future(self.speech_detector.scores(audio))
            if options.vad_filter:
                speech = speech_map(scores, len(audio))
            if options.word_timestamps:
                voice = speech_map(scores, len(audio), VOICE_MIN_SILENCE_MS, VOICE_PAD_MS)
        return TranscriptionJob(self, audio, speech, voice, options, request_id, started)

    async def window(self, audio: np.ndarray, seek: int, start_index: int, detect_language: bool = False,
                     beams: int = 1, audio_positions: int | None = None) -> SpeechWindow:
        """The 30 s window starting `seek` frames into the audio, its features computed on the torch thread."""
        features = await on_torch_thread(self._timed, "features", window_features, self.feature_extractor, audio, seek)
        return SpeechWindow(features, start_index, detect_language, beams, audio_positions)

    def decoder_prompt(self, previous: list[int], language: str, task: str) -> tuple[list[int], int]:
        """<|startofprev|> and the latest previous text, then the start-of-transcript sequence; and where
        <|startoftranscript|> sits."""
        tokens = self.tokens
        context = []
        if previous and tokens.start_of_previous is not None:
            context = [tokens.start_of_previous, *previous[-(self.context_length // 2 - 1):]]
        start = [tokens.start_of_transcript]
        if self.multilingual:
            start += [tokens.languages[language], tokens.translate if task == "translate" else tokens.transcribe]
        return context + start, len(context)

    def add(self, prompt: list[int], window: SpeechWindow, temperature: float, request_id: str,
            max_tokens: int | None = None) -> Sequence:
        limit = max_tokens or min(self.context_length // 2, self.context_length - len(prompt))
        try:
            return self.engine.add(prompt, SamplingParams(max_tokens=limit, temperature=temperature), request_id,
                                   inputs=window)
        except QueueFullError as error:
            raise server_busy(error) from None

    def text_of(self, tokens: list[int]) -> str:
        # no clean-up of spaces: the text of a segment's first tokens then always begins its whole text
        return self.tokenizer.decode(tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def language_code(self, token_id: int) -> str:
        return next(code for code, language_id in self.tokens.languages.items() if language_id == token_id)

    def timings(self) -> dict[str, float]:
        phases = {**self.engine.runner.seconds, **self.seconds, "vad": self.speech_detector.busy_seconds}
        return {phase: round(seconds, 3) for phase, seconds in phases.items()}

    def _timed(self, phase: str, function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        started = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            self.seconds[phase] += time.perf_counter() - started


class TranscriptionJob:
    """One upload's transcription: iterate deltas() for its text; `transcript` is complete when that ends."""

    def __init__(self, service: TranscriptionService, audio: np.ndarray, speech: SpeechMap, voice: SpeechMap,
                 options: TranscriptionOptions, request_id: str, started: float) -> None:
        self.service = service
        self.audio = speech.compact(audio)  # what Whisper hears; segment times are mapped back through `speech`
        self.speech = speech
        self.voice = voice  # where the voice is, finely: word timestamps are trimmed to it
        self.options = options
        self.request_id = request_id
        self.started = started
        self.transcript = Transcript(options.task, duration=len(audio) / SAMPLE_RATE,
                                     words=[] if options.word_timestamps else None)
        self.content_frames = len(self.audio) // service.feature_extractor.hop_length
        self.window_frames = service.feature_extractor.nb_max_frames
        self.first_token_at: float | None = None
        self.generated_tokens = 0
        self.windows = 0
        self._text_started = False
        self._blank_tail = ""

    async def deltas(self) -> AsyncIterator[str]:
        """The transcript's text as it becomes final, window after window; leaving early cancels the decoding."""
        if self.content_frames == 0:  # nothing but silence: nothing to decode, no language to detect
            self._report()
            return
        language = self.options.language or await self._detect_language()
        self.transcript.language = LANGUAGES.get(language, language)
        previous = self._initial_prompt()
        seek = 0
        while seek < self.content_frames:
            final = seek + self.window_frames >= self.content_frames
            for attempt, temperature in enumerate(temperatures := self.options.temperatures()):
                last_attempt = attempt == len(temperatures) - 1
                seq = await self._submit_window(seek, previous, language, temperature)
                # a beam search's text is only known at its end: held till then
                gate = StreamedText(self.service.text_of, self.service.tokens.timestamp_begin, final,
                                    hold=not last_attempt or seq.inputs.beams > 1)
                async for delta in self.service.engine.stream(seq):
                    self._received(delta)
                    if text := self._visible(gate.feed(delta.token_ids, delta.window.no_speech_prob)):
                        yield text
                window = delta.window  # the last delta's: what the window decoded
                avg_logprob = window.decoded.logprob / max(len(window.decoded.tokens), 1)
                ratio = compression_ratio(self.service.text_of(window.decoded.tokens))
                if last_attempt or not decoded_badly(window.no_speech_prob, avg_logprob, ratio):
                    break
            words = await self._timed_words(window, language) if self.options.word_timestamps else []
            segments_before = len(self.transcript.segments)
            advance, kept_tokens = self._add_segments(window, avg_logprob, ratio, seek, final, temperature, words)
            kept = "".join(segment.text for segment in self.transcript.segments[segments_before:])
            if text := self._visible(gate.finish(kept)):
                yield text
            if temperature > CONDITION_MAX_TEMPERATURE:
                previous.clear()  # what a hot decoding wrote is no context for the next window
            else:
                previous.extend(kept_tokens)
            seek += advance
        self._report()

    async def _submit_window(self, seek: int, previous: list[int], language: str, temperature: float) -> Sequence:
        service = self.service
        prompt, start_index = service.decoder_prompt(previous, language, self.options.task)
        beams = service.beams if temperature == 0 else 1  # hotter retries sample, as OpenAI's do
        audio_positions = None
        if self.options.word_timestamps:
            audio_positions = max(1, (min(self.window_frames, self.content_frames - seek) + 1) // 2)
        window = await service.window(self.audio, seek, start_index, beams=beams, audio_positions=audio_positions)
        self.windows += 1
        return service.add(prompt, window, temperature, self.request_id)

    def _received(self, delta: Delta) -> None:
        """A delta of a window: an error fails the transcription; its tokens are counted for the log."""
        check_error(delta)
        self.first_token_at = self.first_token_at or time.perf_counter()
        self.generated_tokens += len(delta.token_ids)

    async def _detect_language(self) -> str:
        service = self.service
        if not service.multilingual:
            return "en"
        window = await service.window(self.audio, 0, start_index=0, detect_language=True)
        seq = service.add([service.tokens.start_of_transcript], window, 0.0, self.request_id, max_tokens=1)
        async for delta in service.engine.stream(seq):
            check_error(delta)
        return service.language_code(seq.output_ids[0])

    def _initial_prompt(self) -> list[int]:
        if self.options.prompt is None:
            return []
        return self.service.tokenizer.encode(" " + self.options.prompt.strip(), add_special_tokens=False)

    async def _timed_words(self, window: WindowResult, language: str) -> list[TimedWord]:
        """The window's words timed by its cross-attention, off the event loop."""
        decode = self.service.tokenizer.decode
        text_language = "en" if self.options.task == "translate" else language
        return await on_torch_thread(self.service._timed, "word_timing", align_words, window.alignment_scores,
                                     window.decoded.tokens, self.service.tokens.end_of_text, decode, text_language)


    def _add_segments(self, window: WindowResult, avg_logprob: float, ratio: float, seek: int, final: bool,
                      temperature: float, words: list[TimedWord]) -> tuple[int, list[int]]:
        """Append the window's segments (none if it is silence) and their words; return the frames to advance
        and the tokens the transcript kept."""
        frames = min(self.window_frames, self.content_frames - seek)
        if is_silent(window.no_speech_prob, avg_logprob):
            return frames, []
        tokens = self.service.tokens
        generated = [token for token in window.decoded.tokens if token != tokens.end_of_text]
        parts, advance = split_window(generated, tokens.timestamp_begin, frames, final)
        offset, duration = seek / FRAMES_PER_SECOND, self.transcript.duration

        def original(seconds: float, is_end: bool = False) -> float:
            return round(min(self.speech.original_seconds(offset + seconds, is_end), duration), 3)

        segments, text_tokens_before = self.transcript.segments, 0
        for part in parts:
            text_tokens = sum(token < tokens.end_of_text for token in part.tokens)
            part_words = [self._word(w.word, original(w.start), original(w.end, is_end=True)) for w in words
                          if text_tokens_before <= w.first_text_token < text_tokens_before + text_tokens]
            text_tokens_before += text_tokens
            start, end = original(part.start), original(part.end, is_end=True)
            if part_words:  # the words' times are finer than the window's timestamp tokens
                start, end = part_words[0].start, part_words[-1].end
                self.transcript.words.extend(part_words)
            segments.append(TranscriptionSegment(
                id=len(segments), seek=round(self.speech.original_seconds(offset) * FRAMES_PER_SECOND),
                start=start, end=end, text=self.service.text_of(part.tokens),
                tokens=part.tokens, temperature=temperature, avg_logprob=avg_logprob,
                compression_ratio=ratio, no_speech_prob=window.no_speech_prob))
        return advance, [token for part in parts for token in part.tokens]

    def _word(self, word: str, start: float, end: float) -> TranscriptionWord:
        """The word as the transcript lists it: no leading space, its silent edges trimmed off."""
        start, end = self.voice.trim(start, end)
        return TranscriptionWord(word=word.strip(), start=round(start, 3), end=round(end, 3))

    def _visible(self, text: str) -> str:
        """The transcript's text has no blank edges: its leading blanks never show, trailing ones wait for what
        follows them."""
        text = self._blank_tail + text
        if not self._text_started:
            text = text.lstrip()
            self._text_started = bool(text)
        shown = text.rstrip()
        self._blank_tail = text[len(shown):]
        return shown

    def _report(self) -> None:
        """Log the finished job, and count its audio."""
        if self.service.metrics:
            self.service.metrics.transcribed(self.transcript.duration)
        wall = time.perf_counter() - self.started
        first_token = (self.first_token_at or time.perf_counter()) - self.started
        logger.info("transcription %s: %.1f s of audio in %.2f s (%.1f audio s per wall s), first token after "
                    "%.0f ms, %d tokens at %.1f tokens/s, %d windows", self.request_id, self.transcript.duration,
                    wall, self.transcript.duration / wall, first_token * 1000, self.generated_tokens,
                    self.generated_tokens / wall, self.windows)


async def start_transcription_service(config: Config, progress: StartupProgress) -> TranscriptionService:
    loaded, engine = await started_engine(config, progress, load_whisper, build_whisper_engine)
    service = TranscriptionService(engine, loaded, config.served_names(loaded.name), config.whisper_beam_size)
    logger.info("serving %s (speech to text) on http://%s:%d", ", ".join(service.served_names), config.host,
                config.port)
    return service
