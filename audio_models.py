"""The OpenAI audio wire format: the transcription form's fields, and the JSON and stream events sent back."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

ResponseFormat = Literal["json", "text", "srt", "verbose_json", "vtt"]


class TranscriptionForm(BaseModel):
    """The multipart fields besides the file; fields this server does not use are accepted and ignored."""
    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    model: str
    language: str | None = None
    prompt: str | None = None
    response_format: ResponseFormat = "json"
    temperature: float = Field(default=0.0, ge=0.0, le=1.0)
    timestamp_granularities: list[Literal["segment"]] = Field(default_factory=list, alias="timestamp_granularities[]")
    stream: bool = False

    @field_validator("language", "prompt")
    @classmethod
    def blank_is_absent(cls, value: str | None) -> str | None:
        return value if value and value.strip() else None


class DurationUsage(BaseModel):
    type: Literal["duration"] = "duration"
    seconds: float


class TranscriptionSegment(BaseModel):
    id: int
    seek: int  # where the segment's window starts, in 10 ms mel frames
    start: float
    end: float
    text: str
    tokens: list[int]
    temperature: float
    avg_logprob: float
    compression_ratio: float
    no_speech_prob: float


class Transcription(BaseModel):
    text: str
    usage: DurationUsage


class VerboseTranscription(BaseModel):
    task: Literal["transcribe", "translate"]
    language: str
    duration: float
    text: str
    segments: list[TranscriptionSegment]
    usage: DurationUsage


class TranscriptTextDelta(BaseModel):
    type: Literal["transcript.text.delta"] = "transcript.text.delta"
    delta: str


class TranscriptTextDone(BaseModel):
    type: Literal["transcript.text.done"] = "transcript.text.done"
    text: str
