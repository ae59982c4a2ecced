"""Silence skipped before decoding: Silero VAD (its model ships inside the silero-vad wheel) finds where
someone speaks, the speech is joined into one shorter clip for Whisper, and every time Whisper reports on
that clip is mapped back to the upload's own clock. Whisper never sees a long silence, so it can neither
start a segment at 0 s that begins 12 s later, nor hallucinate text inside one."""

from __future__ import annotations

import bisect
import queue
from dataclasses import dataclass

import numpy as np
import torch

from speech.audio import SAMPLE_RATE

_threads = torch.get_num_threads()
from silero_vad import get_speech_timestamps, load_silero_vad  # noqa: E402

torch.set_num_threads(_threads)  # importing silero_vad set it to 1 for the whole process: every model ran on one core

# faster-whisper's defaults for Whisper: generous padding keeps word edges, and pauses under 2 s stay in
MIN_SILENCE_MS = 2000
SPEECH_PAD_MS = 400
THRESHOLD = 0.5
# where the voice is, to the syllable, for trimming word timestamps
VOICE_MIN_SILENCE_MS = 100
VOICE_PAD_MS = 30


@dataclass(frozen=True)
class SpeechMap:
    """The speech chunks kept, as (start, end) samples of the upload, in order."""
    chunks: tuple[tuple[int, int], ...]

    def compact(self, audio: np.ndarray) -> np.ndarray:
        """The speech alone, chunk after chunk."""
        if not self.chunks:
            return audio[:0]
        return np.concatenate([audio[start:end] for start, end in self.chunks])

    def original_seconds(self, seconds: float, is_end: bool = False) -> float:
        """Where a time on the compact clip lies in the upload. A time on the seam between two chunks is the
        first chunk's end when it ends something, the second chunk's start when it starts something."""
        if not self.chunks:
            return seconds
        sample = seconds * SAMPLE_RATE
        compact_starts = np.cumsum([0] + [end - start for start, end in self.chunks[:-1]]).tolist()
        find = bisect.bisect_left if is_end else bisect.bisect_right
        index = min(max(find(compact_starts, sample) - 1, 0), len(self.chunks) - 1)
        start, end = self.chunks[index]
        return min(start + sample - compact_starts[index], end) / SAMPLE_RATE


    def trim(self, start: float, end: float) -> tuple[float, float]:
        """A span of the upload (seconds) without the silence at its edges: cut to the chunks it overlaps."""
        overlapping = [(a / SAMPLE_RATE, b / SAMPLE_RATE) for a, b in self.chunks
                       if a / SAMPLE_RATE < end and b / SAMPLE_RATE > start]
        if not overlapping:
            return start, end
        return max(start, overlapping[0][0]), min(end, overlapping[-1][1])


class SpeechDetector:
    """Silero's model keeps state between the chunks it scores, so each upload borrows a model of its own
    (loaded when all are busy, a couple of MB each): a long upload never makes a short one wait. The ONNX
    model runs on one onnxruntime thread: 1.7x faster than the TorchScript one on the development CPU, and its
    threads never compete with the OpenMP threads of the engine's steps."""

    def __init__(self) -> None:
        self.idle_models: queue.SimpleQueue = queue.SimpleQueue()
        self.idle_models.put(load_silero_vad(onnx=True))

    def speech_map(self, audio: np.ndarray, min_silence_ms: int = MIN_SILENCE_MS,
                   pad_ms: int = SPEECH_PAD_MS) -> SpeechMap:
        """Where the audio (16 kHz mono float32) holds speech, silences shorter than min_silence_ms included;
        call it off the event loop."""
        try:
            model = self.idle_models.get_nowait()
        except queue.Empty:
            model = load_silero_vad(onnx=True)
        try:
            with torch.inference_mode():
                found = get_speech_timestamps(torch.from_numpy(audio), model, threshold=THRESHOLD,
                                              sampling_rate=SAMPLE_RATE, min_silence_duration_ms=min_silence_ms,
                                              speech_pad_ms=pad_ms)
        finally:
            self.idle_models.put(model)
        return SpeechMap(tuple((span["start"], span["end"]) for span in found))
