"""The real server with `--serving-type whisper` (the embedded tiny.en), driven by the official OpenAI SDK with
speech synthesised by espeak-ng."""

import re
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import openai
import pytest
from openai import OpenAI
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers.abandoned import health, leave_once_running, wait_until_quiet
from tests.helpers.server_process import running_server
from tests.helpers.synthetic_speech import SENTENCES, espeak_available, speak, spoken_clip, wav_bytes, wav_seconds

pytestmark = pytest.mark.e2e

SRT_TIME = r"(\d\d):(\d\d):(\d\d),(\d\d\d)"
VTT_TIME = r"(\d\d):(\d\d):(\d\d)\.(\d\d\d)"


@pytest.fixture(scope="session")
def clips() -> dict[str, bytes]:
    if not espeak_available():
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng); it synthesises the test speech")
    return {"fox": spoken_clip(SENTENCES[:1], pause_seconds=0.5),
            "long": spoken_clip(SENTENCES, pause_seconds=2.5),
            "very long": spoken_clip(SENTENCES * 3, pause_seconds=2.5),  # about 3.5 minutes
            **{f"short{i}": spoken_clip([sentence], pause_seconds=0.5) for i, sentence in enumerate(SENTENCES[1:7])}}


@pytest.fixture(scope="module")
def server() -> str:
    with running_server("--serving-type", "whisper") as base_url:
        yield base_url


@pytest.fixture(scope="module")
def client(server) -> OpenAI:
    return OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=300)


def transcribe(client: OpenAI, data: bytes, **options):
    return client.audio.transcriptions.create(file=("speech.wav", data), model="whisper-1", temperature=0, **options)


def seconds(match: tuple[str, str, str, str]) -> float:
    hours, minutes, whole, milliseconds = map(int, match)
    return hours * 3600 + minutes * 60 + whole + milliseconds / 1000


def assert_cues_are_monotonic(times: list[float], duration: float) -> None:
    starts, ends = times[0::2], times[1::2]
    assert starts and len(starts) == len(ends)
    assert all(0 <= start <= end <= duration + 1e-3 for start, end in zip(starts, ends))
    assert times == sorted(times)


def test_server_reports_the_audio_endpoints(server):
    root = httpx.get(server).json()
    assert root["serving_type"] == "whisper" and "/v1/audio/transcriptions" in root["endpoints"]
    assert httpx.get(f"{server}/health").json()["status"] == "ok"
    assert [m["id"] for m in httpx.get(f"{server}/v1/models").json()["data"]] == ["whisper-tiny.en"]


def voiced(sentence: str) -> tuple[np.ndarray, int, float, float]:
    """espeak's samples of the sentence, their rate, and where the voice starts and stops in them (seconds)."""
    samples, rate = speak(sentence)
    loud = np.flatnonzero(np.abs(samples.astype(np.float32)) > 0.02 * np.abs(samples).max())
    return samples, rate, loud[0] / rate, (loud[-1] + 1) / rate


def silence(seconds: float, rate: int) -> np.ndarray:
    return np.zeros(round(seconds * rate), dtype="<i2")


@pytest.fixture(scope="module")
def laid_out(clips) -> dict[str, tuple[bytes, list[tuple[float, float]]]]:
    """Clips with known speech: each as WAV bytes and its (start, end) of voice in seconds."""
    fox, rate, fox_on, fox_off = voiced(SENTENCES[0])
    step, _, step_on, step_off = voiced(SENTENCES[1])
    pause = len(step) / rate + 4
    return {
        "silence then fox": (wav_bytes(np.concatenate([silence(12, rate), fox, silence(0.5, rate)]), rate),
                             [(12 + fox_on, 12 + fox_off)]),
        "step, pause, fox": (wav_bytes(np.concatenate([step, silence(4, rate), fox, silence(0.5, rate)]), rate),
                             [(step_on, step_off), (pause + fox_on, pause + fox_off)]),
    }


def test_speech_after_a_silence_starts_where_the_voice_does(client, laid_out):
    clip, [(voice_on, voice_off)] = laid_out["silence then fox"]
    result = transcribe(client, clip, response_format="verbose_json", timestamp_granularities=["segment"])
    assert "lazy" in result.text.lower() and result.duration == pytest.approx(wav_seconds(clip), abs=0.01)
    assert abs(result.segments[0].start - voice_on) <= 0.5 and abs(result.segments[-1].end - voice_off) <= 0.5
    srt = transcribe(client, clip, response_format="srt")
    assert abs(seconds(re.findall(SRT_TIME, srt)[0]) - voice_on) <= 0.5
    # without the speech detector, tiny.en itself dates the sentence to the start of its 30 s window
    unfiltered = transcribe(client, clip, response_format="verbose_json", timestamp_granularities=["segment"],
                            extra_body={"vad_filter": "false"})
    assert unfiltered.segments[0].start < voice_on - 5


def test_no_text_inside_a_pause_and_each_sentence_on_its_own_time(client, laid_out):
    clip, [(first_on, first_off), (second_on, second_off)] = laid_out["step, pause, fox"]
    segments = transcribe(client, clip, response_format="verbose_json", timestamp_granularities=["segment"]).segments
    assert all(s.end <= first_off + 0.5 or s.start >= second_on - 0.5 for s in segments), segments
    assert abs(segments[0].start - first_on) <= 0.5 and "journey" in segments[0].text.lower()
    second = next(s for s in segments if s.start >= second_on - 0.5)
    assert abs(second.start - second_on) <= 0.5 and abs(segments[-1].end - second_off) <= 0.5


@pytest.mark.parametrize("vad_filter", ["true", "false"])
@pytest.mark.parametrize("name", ["silence then fox", "step, pause, fox"])
def test_words_are_timed_where_they_are_spoken(client, laid_out, name, vad_filter):
    clip, voices = laid_out[name]
    result = transcribe(client, clip, response_format="verbose_json", timestamp_granularities=["word", "segment"],
                        extra_body={"vad_filter": vad_filter})
    words = result.words
    assert " ".join(w.word for w in words) == " ".join(result.text.split())  # the words spell the text
    times = [t for w in words for t in (w.start, w.end)]
    assert times == sorted(times) and 0 <= times[0] and times[-1] <= result.duration
    for voice_on, voice_off in voices:  # each sentence's first and last word, against the voice
        sentence = [w for w in words if voice_on - 0.5 <= w.start and w.end <= voice_off + 0.5]
        assert len(sentence) >= 8, (voices, words)
        assert abs(sentence[0].start - voice_on) <= 0.5 and abs(sentence[-1].end - voice_off) <= 0.5
    assert len(words) == sum(len([w for w in words if on - 0.5 <= w.start and w.end <= off + 0.5])
                             for on, off in voices), "a word inside a silence"
    # each segment runs from its first word's start to its last word's end
    assert {s.start for s in result.segments} <= {w.start for w in words}
    assert {s.end for s in result.segments} <= {w.end for w in words}


@pytest.mark.parametrize("flag, logged", [("--hqq", "HQQ"), ("--int8", r"int8 \(W8A8\)")])
def test_quantised_whisper_still_transcribes(clips, tmp_path, flag, logged):
    log = tmp_path / "server.log"
    with running_server("--serving-type", "whisper", flag, "true", log_path=log) as base_url:
        client = OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=300)
        result = transcribe(client, clips["fox"], response_format="verbose_json", timestamp_granularities=["word"])
    assert "lazy dog" in result.text.lower() and len(result.words) >= 8
    quantised = re.search(logged + r" quantised (\d+) linear layers", log.read_text())
    assert quantised and int(quantised[1]) > 0


def test_beam_search_serves_text_times_and_streams_that_agree(clips, laid_out):
    """--whisper-beam-size 5: each window decoded at temperature 0 is a five-beam search. Its words are timed
    where they are spoken, a long clip's windows chain, its stream carries the final text, and clips decoded
    together equal each decoded alone."""
    with running_server("--serving-type", "whisper", "--whisper-beam-size", "5") as base_url:
        client = OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=300)
        clip, voices = laid_out["step, pause, fox"]
        timed = transcribe(client, clip, response_format="verbose_json", timestamp_granularities=["word", "segment"])
        long = transcribe(client, clips["long"], response_format="verbose_json")
        streamed = list(transcribe(client, clips["long"], stream=True))
        names = ["fox", "short0", "short1", "short2"]
        alone = [transcribe(client, clips[name]).text for name in names]
        with ThreadPoolExecutor(len(names)) as pool:
            together = list(pool.map(lambda name: transcribe(client, clips[name]).text, names))
    assert " ".join(w.word for w in timed.words) == " ".join(timed.text.split())
    for voice_on, voice_off in voices:
        sentence = [w for w in timed.words if voice_on - 0.5 <= w.start and w.end <= voice_off + 0.5]
        assert len(sentence) >= 8 and abs(sentence[0].start - voice_on) <= 0.5, timed.words
        assert abs(sentence[-1].end - voice_off) <= 0.5, timed.words
    assert len({s.seek for s in long.segments}) >= 2
    for word in ("fox", "journey", "weather", "meeting", "library", "engineers"):
        assert word in long.text.lower(), long.text
    assert "".join(e.delta for e in streamed[:-1]) == streamed[-1].text == long.text
    assert together == alone and "lazy dog" in alone[0].lower()


def test_compiled_static_decode_step_serves_the_same_transcript(client, clips, tmp_path):
    """--torch-compile: the decode step is compiled for every bucket of windows before the server is ready,
    and then transcribes as the eager server does (the module's server), words and all."""
    log = tmp_path / "server.log"
    with running_server("--serving-type", "whisper", "--torch-compile", "true", "--continuous-batching-batch-size",
                        "2", log_path=log) as base_url:
        compiled = OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=300)
        names = ["fox", "short0", "short1"]
        with ThreadPoolExecutor(len(names)) as pool:
            served = list(pool.map(lambda name: transcribe(compiled, clips[name], response_format="verbose_json",
                                                           timestamp_granularities=["word"]), names))
    expected = [transcribe(client, clips[name], response_format="verbose_json", timestamp_granularities=["word"])
                for name in names]
    assert [r.text for r in served] == [r.text for r in expected] and "lazy dog" in served[0].text.lower()
    for ours, theirs in zip(served, expected):
        assert [w.word for w in ours.words] == [w.word for w in theirs.words]
        assert all(abs(a.start - b.start) <= 0.02 for a, b in zip(ours.words, theirs.words))
    text = log.read_text()
    assert "static cache:" in text and "Whisper decode step for 2 windows ready" in text


def test_word_timestamps_need_verbose_json(server, clips):
    response = httpx.post(f"{server}/v1/audio/transcriptions", files={"file": ("fox.wav", clips["fox"])},
                          data={"model": "whisper-1", "timestamp_granularities[]": "word"})
    assert response.status_code == 400 and response.json()["error"]["param"] == "timestamp_granularities"


def test_silence_alone_is_an_empty_transcript(client):
    rate = 16000
    result = transcribe(client, wav_bytes(silence(10, rate), rate), response_format="verbose_json",
                        timestamp_granularities=["segment"])
    assert result.text == "" and result.segments == [] and result.duration == pytest.approx(10)


def test_transcribes_the_fox(client, clips):
    text = transcribe(client, clips["fox"]).text.lower()
    for words in ("quick", "fox", "lazy dog"):
        assert words in text, text


def test_every_response_format(client, clips):
    fox, duration = clips["fox"], wav_seconds(clips["fox"])
    text = transcribe(client, fox).text
    assert transcribe(client, fox, response_format="text") == text + "\n"

    srt = transcribe(client, fox, response_format="srt")
    assert re.match(rf"1\n{SRT_TIME} --> {SRT_TIME}\n\S", srt), srt
    assert_cues_are_monotonic([seconds(m) for m in re.findall(SRT_TIME, srt)], duration)

    vtt = transcribe(client, fox, response_format="vtt")
    assert vtt.startswith("WEBVTT\n\n"), vtt
    assert_cues_are_monotonic([seconds(m) for m in re.findall(VTT_TIME, vtt)], duration)

    verbose = transcribe(client, fox, response_format="verbose_json", timestamp_granularities=["segment"])
    assert (verbose.language, verbose.text, verbose.task) == ("english", text, "transcribe")
    assert verbose.duration == pytest.approx(duration, abs=0.01)
    first = verbose.segments[0]
    assert first.id == 0 and first.seek == 0 and "fox" in first.text.lower()
    assert -1 < first.avg_logprob < 0 and 0 <= first.no_speech_prob < 0.5 and 0 < first.compression_ratio < 2.4
    assert first.temperature == 0.0  # decoded well at once: no fallback
    assert first.tokens[0] >= 50363 and first.tokens[-1] >= 50363  # tiny.en's timestamps: kept in the tokens
    assert verbose.usage.seconds == pytest.approx(duration, abs=0.01)


def test_streaming_sends_text_deltas_then_the_whole_text(client, clips):
    events = list(transcribe(client, clips["fox"], stream=True))
    deltas = [e.delta for e in events if e.type == "transcript.text.delta"]
    assert len(deltas) >= 5  # token by token, not one final chunk
    assert [e.type for e in events][-1] == "transcript.text.done"
    assert "".join(deltas) == events[-1].text == transcribe(client, clips["fox"]).text


def test_a_long_clip_is_transcribed_whole(client, clips):
    duration = wav_seconds(clips["long"])
    assert 65 < duration < 80
    verbose = transcribe(client, clips["long"], response_format="verbose_json")
    segments = verbose.segments
    assert segments[0].start < 2.0 and segments[-1].end > duration - 8
    assert_cues_are_monotonic([t for s in segments for t in (s.start, s.end)], duration)
    assert len({s.seek for s in segments}) >= 2  # more than one 30 s window
    text = verbose.text.lower()
    for word in ("fox", "journey", "weather", "meeting", "library", "engineers"):
        assert word in text, text
    streamed = list(transcribe(client, clips["long"], stream=True))
    assert "".join(e.delta for e in streamed[:-1]) == streamed[-1].text == verbose.text


def test_concurrent_transcriptions_equal_each_alone(client, clips):
    names = ["long", "fox", *(f"short{i}" for i in range(6))]

    def segments(name: str) -> list[tuple]:
        result = transcribe(client, clips[name], response_format="verbose_json")
        return [(s.start, s.end, s.text, tuple(s.tokens)) for s in result.segments]

    alone = [segments(name) for name in names]
    with ThreadPoolExecutor(len(names)) as pool:
        together = list(pool.map(segments, names))
    assert together == alone


@pytest.mark.parametrize("name, data", [
    ("notes.txt", b"This is a text file, not a recording.\n" * 40),
    ("noise.wav", bytes(range(256)) * 64),
    ("empty.wav", b""),
])
def test_what_is_not_audio_is_a_400(client, name, data):
    with pytest.raises(openai.BadRequestError) as error:
        client.audio.transcriptions.create(file=(name, data), model="whisper-1")
    assert error.value.body["param"] == "file"
    assert re.search("not audio|empty", error.value.body["message"])


def test_bad_fields_are_a_400_naming_the_field(server, clips):
    url = f"{server}/v1/audio/transcriptions"
    files = {"file": ("fox.wav", clips["fox"])}
    for data, param in [({"model": "whisper-1", "response_format": "xml"}, "response_format"),
                        ({"model": "whisper-1", "temperature": "3"}, "temperature"),
                        ({"response_format": "json"}, "model"),
                        ({"model": "whisper-1", "language": "de"}, "language")]:
        response = httpx.post(url, files=files, data=data, timeout=60)
        assert response.status_code == 400, data
        assert response.json()["error"]["param"] == param
    assert httpx.post(url, data={"model": "whisper-1"}).json()["error"]["param"] == "file"


def test_prompt_and_language_are_accepted(client, clips):
    text = transcribe(client, clips["fox"], prompt="A sentence about a fox and a dog.", language="en").text.lower()
    assert "fox" in text and "dog" in text


def test_translation_needs_a_multilingual_model(client, clips):
    with pytest.raises(openai.BadRequestError, match="English-only"):
        client.audio.translations.create(file=("fox.wav", clips["fox"]), model="whisper-1")


def test_oversize_upload_is_a_413_and_a_slow_one_a_408(clips):
    big = clips["long"] * 2  # ~6 MB of WAV; "long" alone (70 s) is ~3 MB
    with running_server("--serving-type", "whisper", "--max-audio-mb", "4", "--request-timeout", "0.5") as base_url:
        response = httpx.post(f"{base_url}/v1/audio/transcriptions", files={"file": ("big.wav", big)},
                              data={"model": "whisper-1"}, timeout=60)
        slow = httpx.post(f"{base_url}/v1/audio/transcriptions", files={"file": ("long.wav", clips["long"])},
                          data={"model": "whisper-1"}, timeout=60)
    assert response.status_code == 413
    assert response.json()["error"]["param"] == "file" and "4 MB" in response.json()["error"]["message"]
    assert slow.status_code == 408 and slow.json()["error"]["code"] == "request_timeout"


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_disconnects_stops_its_decoding(server, clips, stream):
    path = "/v1/audio/transcriptions"
    request = {"files": {"file": ("long.wav", clips["very long"])},
               "data": {"model": "whisper-1", "stream": str(stream)}}
    if stream:
        with httpx.stream("POST", f"{server}{path}", timeout=60, **request) as response:
            # the first text (a keep-alive comment may come before it on a slow machine)
            assert next(line for line in response.iter_lines() if line and not line.startswith(":"))
            left_at_step = health(server)["steps"]
    else:
        left_at_step = leave_once_running(server, path, **request)
    wait_until_quiet(server, left_at_step)  # the whole clip takes hundreds of steps


def test_metrics_count_the_audio_transcribed(server, client, clips):
    def audio_seconds() -> float:
        text = httpx.get(f"{server}/metrics").text
        return sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
                   if sample.name == "batchwise_audio_seconds_total")

    before = audio_seconds()
    verbose = transcribe(client, clips["fox"], response_format="verbose_json")
    assert audio_seconds() - before == pytest.approx(verbose.duration, abs=0.01)
