"""Speech-to-text throughput: seconds of audio transcribed per wall second by the whisper server with 1 and
8 concurrent clients, against transformers' own ASR pipeline run sequentially on the same model and clips
(in its own process, after the server stops: both are CPU-bound), and where the server's time goes.

    python -m bench.whisper_bench
    python -m bench.whisper_bench --requests 24 --server-args "" --server-args "--torch-compile true"
    python -m bench.whisper_bench --also-without-vad

Each --server-args is one server configuration, measured one after another in the same run; with
--also-without-vad each is measured again with requests that turn the speech detector off (vad_filter false),
which the pipeline does not run.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import itertools
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
from openai import OpenAI

from bench.report import fmt
from bench.run_all import DEFAULT_MKL_CBWR, RESULTS, ROOT, cpu_model, process_env
from bench.stats import percentile
from config import Config
from tests.helpers.server_process import running_server
from tests.helpers.synthetic_speech import SENTENCES, spoken_clip, wav_seconds

# about 5 s, 15 s and 45 s of speech with pauses
CLIP_SENTENCES = {"short": (SENTENCES[:1], 1.0), "medium": (SENTENCES[1:3], 2.5), "long": (SENTENCES[3:10], 1.5)}
LEVELS = (1, 8)
CHUNK_SECONDS = 30


@dataclass
class Clip:
    name: str
    path: str
    seconds: float
    text: str  # what is spoken in it


@dataclass
class AudioMeasurement:
    configuration: str
    audio_s: float
    wall_s: float
    first_text_s: list[float] = field(default_factory=list)
    latencies_s: list[float] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)  # each request's transcript, in workload order

    @property
    def audio_per_wall(self) -> float:
        return self.audio_s / self.wall_s


def make_clips(folder: Path) -> list[Clip]:
    clips = []
    for name, (sentences, pause) in CLIP_SENTENCES.items():
        data = spoken_clip(sentences, pause)
        path = folder / f"{name}.wav"
        path.write_bytes(data)
        clips.append(Clip(name, str(path), wav_seconds(data), " ".join(sentences)))
    return clips


def workload(clips: list[Clip], requests: int) -> list[Clip]:
    return [clips[index % len(clips)] for index in range(requests)]


def transcribe_streaming(client: OpenAI, clip: Clip, vad_filter: bool) -> tuple[float, float, str]:
    """(seconds to the first text, seconds to the whole transcript, the transcript)"""
    started = time.perf_counter()
    first_text, text = None, ""
    with open(clip.path, "rb") as audio:
        for event in client.audio.transcriptions.create(file=audio, model="whisper-1", temperature=0, stream=True,
                                                        language="en", extra_body={"vad_filter": vad_filter}):
            if event.type == "transcript.text.delta" and first_text is None:
                first_text = time.perf_counter() - started
            if event.type == "transcript.text.done":
                text = event.text
    return first_text or float("nan"), time.perf_counter() - started, text


def run_level(base_url: str, clips: list[Clip], concurrency: int, label: str = "server",
              vad_filter: bool = True) -> AudioMeasurement:
    client = OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=600)
    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda clip: transcribe_streaming(client, clip, vad_filter), clips))
    wall = time.perf_counter() - started
    return AudioMeasurement(f"{label}, {concurrency} concurrent client{'s' * (concurrency > 1)}",
                            sum(c.seconds for c in clips), wall, *map(list, zip(*results)))


def server_snapshot(base_url: str) -> dict[str, float]:
    timings = httpx.get(f"{base_url}/v1/audio/timings").json()
    return {**timings, "steps": httpx.get(f"{base_url}/health").json()["steps"]}


def server_label(server_args: list[str], vad_filter: bool = True, name: str = "server") -> str:
    return " ".join(part for part in (name, shlex.join(server_args), "" if vad_filter else
                                      "(vad_filter false)") if part)


def measured_level(base_url: str, clips: list[Clip], concurrency: int, label: str,
                   vad_filter: bool) -> tuple[AudioMeasurement, dict[str, float]]:
    """One level, and the seconds the server spent in each phase during it."""
    before = server_snapshot(base_url)
    measurement = run_level(base_url, clips, concurrency, label, vad_filter)
    after = server_snapshot(base_url)
    print(f"{measurement.configuration}: {measurement.audio_per_wall:.1f} audio s / wall s", flush=True)
    return measurement, {key: after[key] - before.get(key, 0.0) for key in after}


def whisper_server(server_args: list[str], env: dict[str, str], log_name: str = "whisper-server.log"
                   ) -> contextlib.AbstractContextManager[str]:
    return running_server("--serving-type", "whisper", *server_args, env=env, log_path=RESULTS / log_name)


def measured_levels(base_url: str, server_args: list[str], clips: list[Clip], requests: int,
                    vad_settings: tuple[bool, ...], name: str = "server"
                    ) -> list[tuple[AudioMeasurement, dict[str, float]]]:
    """Every level, with and without VAD as asked, of a running server started with `server_args`."""
    return [measured_level(base_url, workload(clips, requests), level, server_label(server_args, vad_filter, name),
                           vad_filter) for vad_filter, level in itertools.product(vad_settings, LEVELS)]


def run_server(clips: list[Clip], requests: int, server_args: list[str], env: dict[str, str],
               vad_settings: tuple[bool, ...]) -> list[tuple[AudioMeasurement, dict[str, float]]]:
    with whisper_server(server_args, env) as base_url:
        run_level(base_url, clips[:1], 1)  # warm-up
        return measured_levels(base_url, server_args, clips, requests, vad_settings)


def run_baseline(clips: list[Clip], requests: int, env: dict[str, str]) -> AudioMeasurement:
    with tempfile.NamedTemporaryFile(suffix=".json") as output:
        command = [sys.executable, "-m", "bench.whisper_bench", "--baseline-only", output.name,
                   "--requests", str(requests), "--clips", json.dumps([asdict(c) for c in clips])]
        subprocess.run(command, cwd=ROOT, env=env, check=True)
        return AudioMeasurement(**json.loads(Path(output.name).read_text()))


def asr_pipeline():
    """transformers' ASR pipeline on the converted model the server loads, on the CPU in the dtype the server's
    `--torch-dtype auto` picks (bfloat16 where the CPU has bfloat16 matrix units); imported here, in the
    baseline's own process, so that the server's process never loads a second model."""
    from transformers import pipeline

    from speech.loader import whisper_source

    config = Config()
    return pipeline("automatic-speech-recognition", model=str(whisper_source(config)), device="cpu",
                    dtype=config.dtype)


def baseline(clips: list[Clip], requests: int) -> AudioMeasurement:
    """transformers' pipeline, one clip at a time, on the converted model the server loads; audio decoding is
    inside the timing, as it is for the server."""
    from speech.audio import SAMPLE_RATE, decode_audio

    recognizer = asr_pipeline()

    def transcribe(clip: Clip) -> float:
        started = time.perf_counter()
        audio = decode_audio(Path(clip.path).read_bytes())
        chunking = {"chunk_length_s": CHUNK_SECONDS} if clip.seconds > CHUNK_SECONDS else {}
        recognizer({"raw": audio, "sampling_rate": SAMPLE_RATE}, **chunking)
        return time.perf_counter() - started

    transcribe(clips[0])  # warm-up
    started = time.perf_counter()
    latencies = [transcribe(clip) for clip in workload(clips, requests)]
    return AudioMeasurement("transformers pipeline, sequential", sum(c.seconds for c in workload(clips, requests)),
                            time.perf_counter() - started, [], latencies)


def table(measurements: list[AudioMeasurement], base: AudioMeasurement, requests: int) -> list[str]:
    lines = ["| configuration | requests | audio s / wall s | first text p50 / p95 (s) | latency p50 / p95 (s) "
             "| ratio vs pipeline |", "|---|---|---|---|---|---|"]
    for m in [*measurements, base]:
        first = f"{fmt(percentile(m.first_text_s, 0.5))} / {fmt(percentile(m.first_text_s, 0.95))}" \
            if m.first_text_s else "n/a"
        latency = f"{fmt(percentile(m.latencies_s, 0.5))} / {fmt(percentile(m.latencies_s, 0.95))}"
        lines.append(f"| {m.configuration} | {requests} | {m.audio_per_wall:.1f} | {first} | {latency} "
                     f"| {m.audio_per_wall / base.audio_per_wall:.2f}x |")
    return lines


def breakdown(measurement: AudioMeasurement, phases: dict[str, float]) -> list[str]:
    """Seconds per phase during one level. Engine phases run one after another on the engine thread; audio
    decoding and feature extraction run on other threads, overlapping them."""
    steps = phases.pop("steps")
    engine = sum(phases.get(p, 0.0) for p in ("encoder", "decoder_prefill", "decoder_steps", "rules_and_sampling"))
    lines = [f"{measurement.configuration}: wall {measurement.wall_s:.1f} s, {steps:.0f} engine steps "
             f"({1000 * phases.get('decoder_steps', 0.0) / max(steps, 1):.1f} ms decode forward per step), "
             f"engine busy {engine:.1f} s"]
    lines += [f"- {phase}: {seconds:.2f} s ({100 * seconds / measurement.wall_s:.0f}% of wall)"
              for phase, seconds in sorted(phases.items(), key=lambda item: -item[1])]
    return lines


def report(clips: list[Clip], requests: int, server: list[tuple[AudioMeasurement, dict[str, float]]],
           base: AudioMeasurement) -> str:
    lines = [f"# Batchwise whisper benchmark, {datetime.datetime.now().isoformat(timespec='seconds')}", "",
             f"- {cpu_model()}, {os.cpu_count()} CPUs; servers run `--serving-type whisper` with the flags named",
             "- clips (espeak-ng at 120 wpm): " + ", ".join(f"{c.name} {c.seconds:.1f} s" for c in clips)
             + f"; {requests} requests cycling through them, streaming, temperature 0",
             f"- baseline: `pipeline('automatic-speech-recognition')` on the same converted model, one clip at a "
             f"time, chunk_length_s={CHUNK_SECONDS} for clips longer than {CHUNK_SECONDS} s",
             f"- dtype: `--torch-dtype auto` for the servers and the pipeline alike ({Config().dtype})",
             "- target (issue 8): at 8 concurrent clients, at least 5x the pipeline's audio s / wall s", "",
             *table([m for m, _ in server], base, requests), "", "## Where the server's time goes", ""]
    for measurement, phases in server:
        lines += [*breakdown(measurement, dict(phases)), ""]
    return "\n".join(lines)


def speech_parser(description: str, other_process: str) -> argparse.ArgumentParser:
    """The arguments the speech benchmarks share; `other_process`: the hidden flag that runs the baseline alone, in
    a process of its own, writing its measurements to the file it names (the clips come with --clips)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--requests", type=int, default=16, help="requests per configuration (default 16)")
    parser.add_argument("--server-args", action="append",
                        help="extra flags for main.py, one server configuration each time it is given (default: none)")
    parser.add_argument("--also-without-vad", action="store_true",
                        help="measure each server again with vad_filter false in every request")
    parser.add_argument(other_process, metavar="OUTPUT", help=argparse.SUPPRESS)
    parser.add_argument("--clips", help=argparse.SUPPRESS)
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return speech_parser("Batchwise whisper benchmark against transformers' pipeline.", "--baseline-only"
                         ).parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.baseline_only:
        clips = [Clip(**c) for c in json.loads(args.clips)]
        Path(args.baseline_only).write_text(json.dumps(asdict(baseline(clips, args.requests))))
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    env = process_env(os.environ.get("MKL_CBWR", DEFAULT_MKL_CBWR))
    configurations = [shlex.split(flags) for flags in args.server_args or [""]]
    with tempfile.TemporaryDirectory() as folder:
        clips = make_clips(Path(folder))
        vad_settings = (True, False) if args.also_without_vad else (True,)
        server = [result for flags in configurations
                  for result in run_server(clips, args.requests, flags, env, vad_settings)]
        base = run_baseline(clips, args.requests, env)
    text = report(clips, args.requests, server, base)
    (RESULTS / "whisper-latest.md").write_text(text + "\n")
    print("\n" + text, flush=True)


if __name__ == "__main__":
    main()
