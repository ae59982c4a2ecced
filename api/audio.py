"""The OpenAI audio endpoints over HTTP: multipart uploads in; transcripts out as JSON, plain text,
subtitles or server-sent events."""

from __future__ import annotations

from typing import AsyncIterator, Callable

from fastapi import APIRouter, Depends, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, ValidationError
from starlette.datastructures import FormData, UploadFile

from api.middleware import request_id
from api.sse import sse
from models import (DurationUsage, TranscriptFormat, TranscriptionForm, TranscriptTextDelta, TranscriptTextDone,
                    VerboseTranscription)
from models import Transcription as TranscriptionBody
from serving.errors import APIError
from serving.timeouts import finish_unless_abandoned
from serving.transcription import Transcript, TranscriptionJob, TranscriptionOptions, TranscriptionService
from speech.subtitles import to_srt, to_vtt

FORM_OVERHEAD_BYTES = 64 * 1024  # multipart boundaries and the other fields, on top of the audio itself
GRANULARITY_KEYS = ("timestamp_granularities[]", "timestamp_granularities")


def audio_router(ready_service: Callable[[], TranscriptionService], max_audio_mb: int,
                 request_timeout: float | None = None) -> APIRouter:
    """Routes under /audio, for the app's /v1 router. ready_service: the app's dependency that yields the
    service (or a 503 while it loads); request_timeout: seconds a non-streamed transcription may take (408
    after)."""
    router = APIRouter(prefix="/audio")
    limit = max_audio_mb * 1024 * 1024

    async def respond(request: Request, service: TranscriptionService, task: str) -> Response:
        rid = request_id(request)
        form, data = await read_upload(request, limit)
        service.check_model(form.model)
        language = form.language if task == "transcribe" else None
        word_timestamps = "word" in form.timestamp_granularities
        if word_timestamps and form.response_format != "verbose_json":
            raise APIError(400, "timestamp_granularities[]=word needs response_format verbose_json",
                           param="timestamp_granularities")
        # a stream carries text deltas only: neither words nor a window's verdict could reach it
        options = TranscriptionOptions(task, language, form.prompt, form.temperature, form.vad_filter,
                                       temperature_fallback=not form.stream,
                                       word_timestamps=word_timestamps and not form.stream)
        service.check_options(options)
        job = await service.start(data, options, rid)
        if form.stream:
            return sse(stream_events(job), rid)
        await finish_unless_abandoned(drain(job), request.is_disconnected, request_timeout)
        return render(job.transcript, form.response_format)

    @router.post("/transcriptions")
    async def transcriptions(request: Request, service: TranscriptionService = Depends(ready_service)) -> Response:
        return await respond(request, service, "transcribe")

    @router.post("/translations")
    async def translations(request: Request, service: TranscriptionService = Depends(ready_service)) -> Response:
        return await respond(request, service, "translate")

    @router.get("/timings")
    async def timings(service: TranscriptionService = Depends(ready_service)) -> dict[str, float]:
        """Seconds spent so far in each phase (audio decoding, features, encoder, decoder), for benchmarks."""
        return service.timings()

    return router


async def read_upload(request: Request, limit: int) -> tuple[TranscriptionForm, bytes]:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit + FORM_OVERHEAD_BYTES:
        raise too_large(limit)  # before reading a byte of it
    async with request.form() as form:  # closing it deletes the spooled upload
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise APIError(400, "The 'file' field is required: send the audio as a multipart/form-data upload.",
                           param="file")
        fields = form_fields(form)
        data = await upload.read()
    if len(data) > limit:
        raise too_large(limit)
    return fields, data


def form_fields(form: FormData) -> TranscriptionForm:
    values = {key: value for key, value in form.items() if key != "file" and key not in GRANULARITY_KEYS}
    values[GRANULARITY_KEYS[0]] = [value for key in GRANULARITY_KEYS for value in form.getlist(key)]
    try:
        return TranscriptionForm.model_validate(values)
    except ValidationError as error:
        raise RequestValidationError(error.errors(include_context=False, include_input=False)) from None


def too_large(limit: int) -> APIError:
    return APIError(413, f"The audio file is larger than this server's limit of {limit // (1024 * 1024)} MB "
                         "(--max-audio-mb).", param="file", code="file_too_large")


async def drain(job: TranscriptionJob) -> None:
    async for _ in job.deltas():
        pass


async def stream_events(job: TranscriptionJob) -> AsyncIterator[BaseModel]:
    async for text in job.deltas():
        yield TranscriptTextDelta(delta=text)
    yield TranscriptTextDone(text=job.transcript.text)


def render(transcript: Transcript, response_format: TranscriptFormat) -> Response:
    usage = DurationUsage(seconds=round(transcript.duration, 3))
    if response_format == "json":
        return JSONResponse(TranscriptionBody(text=transcript.text, usage=usage).model_dump())
    if response_format == "verbose_json":
        body = VerboseTranscription(task=transcript.task, language=transcript.language,
                                    duration=round(transcript.duration, 3), text=transcript.text,
                                    segments=transcript.segments, words=transcript.words, usage=usage)
        return JSONResponse(body.model_dump(exclude_none=True))
    if response_format == "srt":
        return PlainTextResponse(to_srt(transcript.segments))
    if response_format == "vtt":
        return PlainTextResponse(to_vtt(transcript.segments), media_type="text/vtt")
    return PlainTextResponse(transcript.text + "\n")
