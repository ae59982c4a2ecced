"""Long audio as a chain of 30 s windows, following OpenAI's transcribe(): how one window's tokens become
timed segments, how far the next window starts (seeking by the timestamps the model emitted), and which
streamed text is final."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from transformers import WhisperFeatureExtractor

from speech.audio import SAMPLE_RATE

FRAMES_PER_SECOND = 100  # log-mel frames (hop of 160 samples at 16 kHz)
FRAMES_PER_TIMESTAMP = 2  # one timestamp step is one encoder position, two mel frames
SECONDS_PER_TIMESTAMP = FRAMES_PER_TIMESTAMP / FRAMES_PER_SECOND
NO_SPEECH_THRESHOLD = 0.6  # a window is silence when <|nospeech|> is this likely...
LOGPROB_THRESHOLD = -1.0  # ...and its tokens are on average less likely than this
COMPRESSION_RATIO_THRESHOLD = 2.4  # text that compresses better than this is repeating itself
UNFINISHED_CHARACTER = "\ufffd"  # what decoding shows for a character whose bytes have not all come yet


@dataclass
class TimedTokens:
    tokens: list[int]  # timestamp tokens included
    start: float  # seconds from the window's start
    end: float


def window_features(extractor: WhisperFeatureExtractor, audio: np.ndarray, seek: int) -> torch.Tensor:
    """The log-mel features ([mel bins, frames]) of the 30 s window starting `seek` frames into the audio,
    zero-padded."""
    start = seek * extractor.hop_length
    window = audio[start:start + extractor.n_samples]
    return extractor(window, sampling_rate=SAMPLE_RATE, return_tensors="pt").input_features[0]


def is_silent(no_speech_prob: float, avg_logprob: float) -> bool:
    return no_speech_prob > NO_SPEECH_THRESHOLD and avg_logprob < LOGPROB_THRESHOLD


def decoded_badly(no_speech_prob: float, avg_logprob: float, compression_ratio: float) -> bool:
    """OpenAI's test for decoding a window again at a higher temperature: its text repeats itself or its tokens
    are unlikely, and the window is likely speech (what a likely silence decodes to is not worth a retry)."""
    unlikely = avg_logprob < LOGPROB_THRESHOLD
    likely_speech = no_speech_prob <= NO_SPEECH_THRESHOLD
    return likely_speech and (compression_ratio > COMPRESSION_RATIO_THRESHOLD or unlikely)


def split_window(tokens: list[int], timestamp_begin: int, window_frames: int,
                 final: bool) -> tuple[list[TimedTokens], int]:
    """Segments with text in one window's tokens (end of text excluded), and how many frames to advance.

    Segments end where an end timestamp is followed by the next start timestamp. A window that ends inside
    a segment is cut at the last complete one and the next window starts there, so that speech is decoded
    again with its full audio; in the audio's final window there is no more audio, so the unfinished
    segment is kept and runs to the window's end."""
    def seconds(token: int) -> float:
        return (token - timestamp_begin) * SECONDS_PER_TIMESTAMP

    is_timestamp = [token >= timestamp_begin for token in tokens]
    window_seconds = window_frames / FRAMES_PER_SECOND
    pair_starts = segment_cuts(tokens, timestamp_begin)
    if not pair_starts:
        if not tokens:
            return [], window_frames
        start = seconds(tokens[0]) if is_timestamp[0] else 0.0
        end = seconds(tokens[-1]) if is_timestamp[-1] and len(tokens) > 1 else window_seconds
        return _with_text([TimedTokens(tokens, start, end)], timestamp_begin), window_frames
    ends_with_segment = is_timestamp[-2:] == [False, True]
    cuts = pair_starts + ([len(tokens)] if ends_with_segment else [])
    segments, last = [], 0
    for cut in cuts:
        part = tokens[last:cut]
        segments.append(TimedTokens(part, seconds(part[0]), seconds(part[-1])))
        last = cut
    if ends_with_segment:
        return _with_text(segments, timestamp_begin), window_frames
    if final:
        segments.append(TimedTokens(tokens[last:], seconds(tokens[last]), window_seconds))
        return _with_text(segments, timestamp_begin), window_frames
    last_end = tokens[last - 1] - timestamp_begin
    return _with_text(segments, timestamp_begin), last_end * FRAMES_PER_TIMESTAMP


def segment_cuts(tokens: list[int], timestamp_begin: int) -> list[int]:
    """Where one segment ends and the next starts: at each timestamp that follows a timestamp."""
    is_timestamp = [token >= timestamp_begin for token in tokens]
    return [i + 1 for i in range(len(tokens) - 1) if is_timestamp[i] and is_timestamp[i + 1]]


def _with_text(segments: list[TimedTokens], timestamp_begin: int) -> list[TimedTokens]:
    return [s for s in segments if any(token < timestamp_begin for token in s.tokens)]


class StreamedText:
    """Releases a window's text, as the transcript will have it, once the transcript is sure to keep it.

    The text is decoded segment by segment, as the transcript's segments are. In the audio's final window it
    flows at once. In earlier windows, text after the window's first pair of timestamps waits for the next pair,
    which closes its segment: a window that ends inside a segment is decoded again from there by the next one.
    A window that may be judged silent holds all its text to the end, and so does one that may yet be decoded
    again (`hold`)."""

    def __init__(self, decode: Callable[[list[int]], str], timestamp_begin: int, final: bool,
                 hold: bool = False) -> None:
        self.decode = decode
        self.timestamp_begin = timestamp_begin
        self.final = final
        self.hold = hold
        self.tokens: list[int] = []
        self.released = ""

    def feed(self, token_ids: list[int], no_speech_prob: float) -> str:
        """The text the window's next tokens release, given its no-speech probability (its deltas carry it)."""
        self.tokens.extend(token_ids)
        if self.hold or no_speech_prob > NO_SPEECH_THRESHOLD:
            return ""
        cuts = segment_cuts(self.tokens, self.timestamp_begin)
        sure = len(self.tokens) if self.final or not cuts else cuts[-1]
        bounds = [0, *(cut for cut in cuts if cut < sure), sure]
        text = "".join(self.decode(self.tokens[start:end]) for start, end in zip(bounds, bounds[1:]))
        return self._release(text.rstrip(UNFINISHED_CHARACTER))

    def finish(self, kept: str) -> str:
        """What is left to release of `kept`, the window's text as the transcript kept it."""
        return self._release(kept)

    def _release(self, text: str) -> str:
        new = text[len(self.released):]
        self.released += new
        return new
