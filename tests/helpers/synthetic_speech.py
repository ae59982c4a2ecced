"""Spoken English clips synthesised with espeak-ng at test time, for tests and benchmarks. Slow speech
(120 words per minute) is what Whisper tiny.en transcribes reliably."""

from __future__ import annotations

import io
import shutil
import subprocess
import tempfile
import wave
from pathlib import Path
from typing import Sequence

import numpy as np

WORDS_PER_MINUTE = 120
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A journey of a thousand miles begins with a single step.",
    "She sells sea shells by the sea shore on a sunny morning.",
    "The weather today is cold and windy with a chance of rain.",
    "Please remember to buy milk, bread and eggs on the way home.",
    "Our meeting will start at nine and finish before lunch.",
    "The library closes early on Sundays during the summer.",
    "Music can change the mood of a room in a few seconds.",
    "Every morning the baker opens the shop before sunrise.",
    "Good engineers write tests before they ship new code.",
]


def espeak_available() -> bool:
    return shutil.which("espeak-ng") is not None


def speak(text: str) -> tuple[np.ndarray, int]:
    """16-bit mono samples and their rate."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "speech.wav"
        subprocess.run(["espeak-ng", "-s", str(WORDS_PER_MINUTE), "-w", str(path), text], check=True,
                       capture_output=True, timeout=60)
        with wave.open(str(path)) as wav:
            samples = np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2")
            return samples, wav.getframerate()


def spoken_clip(sentences: Sequence[str], pause_seconds: float = 1.5) -> bytes:
    """A WAV file of the sentences in turn, each followed by a pause."""
    parts, rate = [], 0
    for sentence in sentences:
        samples, rate = speak(sentence)
        parts += [samples, np.zeros(round(rate * pause_seconds), dtype="<i2")]
    return wav_bytes(np.concatenate(parts), rate)


def wav_bytes(samples: np.ndarray, rate: int) -> bytes:
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(rate)
        wav.writeframes(samples.astype("<i2").tobytes())
    return buffer.getvalue()


def wav_seconds(data: bytes) -> float:
    with wave.open(io.BytesIO(data)) as wav:
        return wav.getnframes() / wav.getframerate()
