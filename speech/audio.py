"""Uploaded audio in any container FFmpeg reads (wav, mp3, flac, ogg/opus, m4a, webm, ...) to 16 kHz mono
float32 samples, through PyAV's bundled FFmpeg."""

from __future__ import annotations

import io

import av
import numpy as np

SAMPLE_RATE = 16000


class AudioDecodeError(ValueError):
    """The upload is empty, not audio, or corrupt: the client's fault, so a 400."""


def decode_audio(data: bytes) -> np.ndarray:
    if not data:
        raise AudioDecodeError("The uploaded file is empty.")
    try:
        container = av.open(io.BytesIO(data), mode="r")
    except av.error.FFmpegError:
        raise AudioDecodeError("The uploaded file is not audio in a format that could be decoded.") from None
    with container:
        if not container.streams.audio:
            raise AudioDecodeError(f"The uploaded file ({container.format.name}) has no audio stream.")
        samples = _resampled_samples(container, container.streams.audio[0])
    if not samples.size:
        raise AudioDecodeError("The uploaded audio file is corrupt: it holds no decodable audio.")
    return samples


def _resampled_samples(container: av.container.InputContainer, stream: av.AudioStream) -> np.ndarray:
    resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
    chunks = []
    try:
        for frame in container.decode(stream):
            chunks.extend(out.to_ndarray().reshape(-1) for out in resampler.resample(frame))
        chunks.extend(out.to_ndarray().reshape(-1) for out in resampler.resample(None))
    except av.error.FFmpegError as error:
        raise AudioDecodeError(f"The uploaded audio file is corrupt: {error}") from None
    return np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.float32)
