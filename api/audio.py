"""The OpenAI audio endpoints over HTTP: multipart uploads in; transcripts out as JSON, plain text,
subtitles or server-sent events."""

from __future__ import annotations

from typing import AsyncIterator, Callable

from fastapi import APIRouter, Depends, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, ValidationError
from starlette.datastructures import FormData, UploadFile

from audio_models import (DurationUsage, ResponseFormat, TranscriptionForm, TranscriptTextDelta,
                          TranscriptTextDone, VerboseTranscription)
from audio_models import Transcription as TranscriptionBody
from serving import APIError, finish_unless_abandoned
from subtitles import to_srt, to_vtt
from transcription import Transcript, TranscriptionJob, TranscriptionOptions, TranscriptionService

WHISPER_ENDPOINTS = ["/v1/audio/transcriptions", "/v1/audio/translations", "/v1/audio/timings", "/v1/models",
                     "/health"]
FORM_OVERHEAD_BYTES = 64 * 1024  # multipart boundaries and the other fields, on top of the audio itself
GRANULARITY_KEYS = ("timestamp_granularities[]", "timestamp_granularities")

EventStreamBuilder = Callable[[AsyncIterator[BaseModel], str], Response]


def audio_router(ready_service: Callable[[], TranscriptionService], event_stream: EventStreamBuilder,
                 max_audio_mb: int, request_timeout: float | None = None) -> APIRouter:
    """Routes under /audio, for the app's /v1 router. ready_service: the app's dependency that yields the
    service (or a 503 while it loads); event_stream: the app's SSE response for a stream of events;
    request_timeout: seconds a non-streamed transcription may take (408 after)."""
    router = APIRouter(prefix="/audio")
    limit = max_audio_mb * 1024 * 1024

    async def respond(request: Request, service: TranscriptionService, task: str) -> Response:
        request_id = getattr(request.state, "request_id", "-")
        form, data = await read_upload(request, limit)
        service.check_model(form.model)
        language = form.language if task == "transcribe" else None
        options = TranscriptionOptions(task, language, form.prompt, form.temperature)
        service.check_options(options)
        job = await service.start(data, options, request_id)
        if form.stream:
            return event_stream(stream_events(job), request_id)
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


def render(transcript: Transcript, response_format: ResponseFormat) -> Response:
    usage = DurationUsage(seconds=round(transcript.duration, 3))
    if response_format == "json":
        return JSONResponse(TranscriptionBody(text=transcript.text, usage=usage).model_dump())
    if response_format == "verbose_json":
        body = VerboseTranscription(task=transcript.task, language=transcript.language,
                                    duration=round(transcript.duration, 3), text=transcript.text,
                                    segments=transcript.segments, usage=usage)
        return JSONResponse(body.model_dump())
    if response_format == "srt":
        return PlainTextResponse(to_srt(transcript.segments))
    if response_format == "vtt":
        return PlainTextResponse(to_vtt(transcript.segments), media_type="text/vtt")
    return PlainTextResponse(transcript.text + "\n")
