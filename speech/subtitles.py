"""Timed segments as SubRip (.srt) and WebVTT (.vtt) subtitles."""

from __future__ import annotations

from typing import Iterable, Protocol


class TimedText(Protocol):
    start: float
    end: float
    text: str


def clock(seconds: float, decimal_marker: str) -> str:
    """HH:MM:SS followed by the marker and milliseconds: 00:00:01,500 (SRT) or 00:00:01.500 (VTT)."""
    milliseconds = round(seconds * 1000)
    hours, milliseconds = divmod(milliseconds, 3_600_000)
    minutes, milliseconds = divmod(milliseconds, 60_000)
    whole_seconds, milliseconds = divmod(milliseconds, 1000)
    return f"{hours:02d}:{minutes:02d}:{whole_seconds:02d}{decimal_marker}{milliseconds:03d}"


def to_srt(segments: Iterable[TimedText]) -> str:
    return "".join(f"{index}\n{clock(s.start, ',')} --> {clock(s.end, ',')}\n{s.text.strip()}\n\n"
                   for index, s in enumerate(segments, start=1))


def to_vtt(segments: Iterable[TimedText]) -> str:
    return "WEBVTT\n\n" + "".join(f"{clock(s.start, '.')} --> {clock(s.end, '.')}\n{s.text.strip()}\n\n"
                                  for s in segments)
