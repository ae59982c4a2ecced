"""Silence skipped before decoding: Silero VAD (its model ships inside the silero-vad wheel) finds where
someone speaks, the speech is joined into one shorter clip for Whisper, and every time Whisper reports on
that clip is mapped back to the upload's own clock. Whisper never sees a long silence, so it can neither
start a segment at 0 s that begins 12 s later, nor hallucinate text inside one."""

from __future__ import annotations

import bisect
import queue
import threading
import time
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass

import numpy as np
import torch

from speech.audio import SAMPLE_RATE

_threads = torch.get_num_threads()
from silero_vad import load_silero_vad  # noqa: E402
from silero_vad.utils_vad import get_speech_timestamps_from_probs  # noqa: E402

torch.set_num_threads(_threads)  # importing silero_vad set it to 1 for the whole process: every model ran on one core

# faster-whisper's defaults for Whisper: generous padding keeps word edges, and pauses under 2 s stay in
MIN_SILENCE_MS = 2000
SPEECH_PAD_MS = 400
THRESHOLD = 0.5
# where the voice is, to the syllable, for trimming word timestamps
VOICE_MIN_SILENCE_MS = 100
VOICE_PAD_MS = 30
# the model's input at 16 kHz: a chunk, after the previous chunk's last samples; its state between chunks
CHUNK_SAMPLES = 512
CONTEXT_SAMPLES = 64
STATE_WIDTH = 128
_RATE = np.array(SAMPLE_RATE, dtype=np.int64)


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
    """Silero's model scores audio 32 ms at a time, keeping state from one chunk to the next. One thread scores
    every upload in flight, the next chunk of each as one batch: at 8 uploads a chunk costs half what it costs
    alone. The thread runs onnxruntime on one core and no torch op, so it works beside the engine's steps without
    starting a second OpenMP pool (batching.torch_thread)."""

    def __init__(self) -> None:
        self.session = load_silero_vad(onnx=True).session
        self.arrivals: queue.SimpleQueue[Scoring] = queue.SimpleQueue()
        self.busy_seconds, self.chunks_scored = 0.0, 0  # for benchmarks and tests
        threading.Thread(target=self._score_forever, name="speech-detector", daemon=True).start()

    def scores(self, audio: np.ndarray) -> Future[list[float]]:
        """The speech probability of each 512-sample chunk of the audio (16 kHz mono float32), scored beside the
        other uploads in flight."""
        scoring = Scoring(np.asarray(audio, dtype=np.float32))
        if scoring.scored:
            scoring.finish()
        else:
            self.arrivals.put(scoring)
        return scoring.future

    def _score_forever(self) -> None:
        scorings: list[Scoring] = []
        state = np.zeros((2, 0, STATE_WIDTH), dtype=np.float32)
        while True:
            arrived = [] if scorings else [self.arrivals.get()]
            while not self.arrivals.empty():
                arrived.append(self.arrivals.get_nowait())
            scorings += arrived
            state = np.concatenate([state, np.zeros((2, len(arrived), STATE_WIDTH), dtype=np.float32)], axis=1)
            # scored, or cancelled (its client left: it stops costing anything at once)
            going = [index for index, scoring in enumerate(scorings) if not scoring.done]
            scorings, state = [scorings[index] for index in going], state[:, going]
            if not scorings:
                continue
            started = time.perf_counter()
            try:
                batch = np.stack([scoring.next_input() for scoring in scorings])
                probabilities, state = self.session.run(None, {"input": batch, "state": state, "sr": _RATE})
            except Exception as error:  # e.g. out of memory: these uploads fail, later ones start afresh
                for scoring in scorings:
                    scoring.finish(error)
                continue
            self.chunks_scored += len(scorings)
            for scoring, probability in zip(scorings, probabilities[:, 0].tolist()):
                scoring.probabilities.append(probability)
                if scoring.scored:
                    scoring.finish()
            self.busy_seconds += time.perf_counter() - started


class Scoring:
    """One upload's way through the detector: each chunk is scored after the model's context, the previous
    chunk's last 64 samples (zeros before the first), as silero_vad's own wrapper feeds it."""

    def __init__(self, audio: np.ndarray) -> None:
        self.audio, self.position = audio, 0
        self.context = np.zeros(CONTEXT_SAMPLES, dtype=np.float32)
        self.probabilities: list[float] = []
        self.future: Future[list[float]] = Future()

    @property
    def scored(self) -> bool:
        return self.position >= len(self.audio)

    @property
    def done(self) -> bool:
        return self.future.done()

    def finish(self, error: Exception | None = None) -> None:
        try:
            if error is None:
                self.future.set_result(self.probabilities)
            else:
                self.future.set_exception(error)
        except InvalidStateError:  # cancelled meanwhile
            pass

    def next_input(self) -> np.ndarray:
        chunk = self.audio[self.position:self.position + CHUNK_SAMPLES]
        self.position += CHUNK_SAMPLES
        model_input = np.concatenate([self.context, chunk, np.zeros(CHUNK_SAMPLES - len(chunk), dtype=np.float32)])
        self.context = model_input[-CONTEXT_SAMPLES:]
        return model_input


def speech_map(scores: list[float], samples: int, min_silence_ms: int = MIN_SILENCE_MS,
               pad_ms: int = SPEECH_PAD_MS) -> SpeechMap:
    """The speech chunks of an upload of `samples` samples from its chunks' scores (SpeechDetector.scores)."""
    found = get_speech_timestamps_from_probs(scores, sampling_rate=SAMPLE_RATE, threshold=THRESHOLD,
                                             min_silence_duration_ms=min_silence_ms, speech_pad_ms=pad_ms,
                                             audio_length_samples=samples)
    return SpeechMap(tuple((span["start"], span["end"]) for span in found))
