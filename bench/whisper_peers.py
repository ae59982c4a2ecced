"""Speech to text against faster-whisper (CTranslate2), in one run on the same clips and the same weights: the
CTranslate2 tiny.en folder the server serves by default (converted once for the server, loaded as it is by
faster-whisper). faster-whisper is a bench dependency only (requirements-bench.txt).

    python -m bench.whisper_peers
    python -m bench.whisper_peers --rounds 3 --server-args "" --server-args "--int8 true" --also-without-vad
    python -m bench.whisper_peers --server-args "" --server-args "OMP_WAIT_POLICY=PASSIVE"

A server configuration may begin with NAME=VALUE words, set in its environment (the last line measures the server
also with OpenMP's passive wait policy, which pays where the cores are shared: docs/deployment.md).

Each round measures every server configuration at 1 and 8 concurrent clients, then faster-whisper in a process
of its own (the servers idle meanwhile): `transcribe` one file after another in float32 and int8, and
`BatchedInferencePipeline` (batch 8, which cuts the audio with its own Silero VAD) in both. Rounds alternate so
that whatever else the machine runs weighs on every configuration alike; the table gives each configuration's
median over the rounds. Every request asks for English at temperature 0 with greedy decoding (beam 1) and
temperature fallback, as both do by default; faster-whisper runs on 2 threads, as the server's torch does on
this machine. Word error rate is over every request's transcript against the clips' spoken text (case and
punctuation ignored, as bench.quality scores it).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import itertools
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path

import ctranslate2
import faster_whisper
import torch
from faster_whisper import BatchedInferencePipeline, WhisperModel

from bench.quality import word_error_rate
from bench.report import cpu_model
from bench.run_all import DEFAULT_MKL_CBWR, RESULTS, ROOT, process_env
from bench.whisper_bench import (AudioMeasurement, Clip, breakdown, make_clips, measured_levels, run_level,
                                 speech_parser, whisper_server, workload)
from config import Config, cpu_flags
from converters.ct2_whisper import embedded_whisper_path

THREADS = 2
BATCH_SIZE = 8
# name: (compute_type, batch size of BatchedInferencePipeline; 0 = WhisperModel.transcribe, one file at a time)
PEERS = {
    "faster-whisper float32, sequential": ("float32", 0),
    "faster-whisper int8, sequential": ("int8", 0),
    f"faster-whisper float32, BatchedInferencePipeline batch {BATCH_SIZE} (its VAD)": ("float32", BATCH_SIZE),
    f"faster-whisper int8, BatchedInferencePipeline batch {BATCH_SIZE} (its VAD)": ("int8", BATCH_SIZE),
}
# OpenMP's wait policy for faster-whisper's process: its default, and the passive one (docs/deployment.md)
WAIT_POLICIES = {"": "", "PASSIVE": ", OMP_WAIT_POLICY=PASSIVE"}
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


def faster_whisper_runs(clips: list[Clip], requests: int) -> list[AudioMeasurement]:
    """Each faster-whisper configuration over the workload, one file after another (a batched pipeline batches
    one file's pieces); decoding the file is inside the timing, as it is for the server."""
    measurements = []
    for name, (compute_type, batch_size) in PEERS.items():
        model = WhisperModel(str(embedded_whisper_path()), device="cpu", compute_type=compute_type,
                             cpu_threads=THREADS)
        transcriber = BatchedInferencePipeline(model) if batch_size else model
        options = {"batch_size": batch_size} if batch_size else {}

        def transcribe(clip: Clip) -> tuple[float, str]:
            started = time.perf_counter()
            segments, _ = transcriber.transcribe(clip.path, language="en", beam_size=1, **options)
            text = "".join(segment.text for segment in segments)  # a generator: decoding happens here
            return time.perf_counter() - started, text.strip()

        transcribe(clips[0])  # warm-up
        requested = workload(clips, requests)
        started = time.perf_counter()
        results = [transcribe(clip) for clip in requested]
        measurements.append(AudioMeasurement(name, sum(c.seconds for c in requested),
                                             time.perf_counter() - started, [], [r[0] for r in results],
                                             [r[1] for r in results]))
        print(f"{name}: {measurements[-1].audio_per_wall:.1f} audio s / wall s", flush=True)
    return measurements


def env_of(words: list[str]) -> dict[str, str]:
    """A server configuration's leading NAME=VALUE words: its environment, as a shell reads them."""
    assignments = itertools.takewhile(lambda word: "=" in word and not word.startswith("-"), words)
    return dict(word.split("=", 1) for word in assignments)


def flags_of(words: list[str]) -> list[str]:
    return words[len(env_of(words)):]


def run_peers(clips: list[Clip], requests: int, env: dict[str, str]) -> list[AudioMeasurement]:
    """faster-whisper with OpenMP's default wait policy, then with the passive one (CTranslate2 ships a libgomp of
    its own, which reads it too): its best of both is what the server is measured against."""
    measurements = []
    for policy in WAIT_POLICIES:
        with tempfile.NamedTemporaryFile(suffix=".json") as output:
            command = [sys.executable, "-m", "bench.whisper_peers", "--peers-only", output.name,
                       "--requests", str(requests), "--clips", json.dumps([asdict(c) for c in clips])]
            policy_env = {key: value for key, value in env.items() if key != "OMP_WAIT_POLICY"}
            subprocess.run(command, cwd=ROOT, env=policy_env | ({"OMP_WAIT_POLICY": policy} if policy else {}),
                           check=True)
            measurements += [AudioMeasurement(**{**m, "configuration": m["configuration"] + WAIT_POLICIES[policy]})
                             for m in json.loads(Path(output.name).read_text())]
    return measurements


def summary(rounds: list[list[AudioMeasurement]], clips: list[Clip], requests: int) -> list[str]:
    spoken = [clip.text for clip in workload(clips, requests)]
    by_name: defaultdict[str, list[AudioMeasurement]] = defaultdict(list)
    for measurement in (m for measurements in rounds for m in measurements):
        by_name[measurement.configuration].append(measurement)
    speed = {name: statistics.median(m.audio_per_wall for m in ms) for name, ms in by_name.items()}
    peers = [name for name in by_name if name.startswith("faster-whisper")]
    best_peer = max(peers, key=speed.__getitem__) if peers else None
    lines = [f"faster-whisper's best here: {best_peer} ({speed[best_peer]:.1f} audio s / wall s)" if peers
             else "faster-whisper not measured (--skip-peers)", "",
             "| configuration | audio s / wall s (median) | each round | latency p50 (s) | WER "
             "| vs faster-whisper's best |",
             "|---|---|---|---|---|---|"]
    for name, measurements in by_name.items():
        wer = word_error_rate([t for m in measurements for t in m.texts], spoken * len(measurements))
        latency = statistics.median(latency for m in measurements for latency in m.latencies_s)
        each = ", ".join(f"{m.audio_per_wall:.1f}" for m in measurements)
        lines.append(f"| {name} | {speed[name]:.1f} | {each} | {latency:.2f} | {100 * wer:.1f}% "
                     f"| {f'{speed[name] / speed[best_peer]:.2f}x' if peers else 'n/a'} |")
    return lines


def machine() -> str:
    flags = cpu_flags()
    present = ", ".join(f"{flag} {'yes' if flag in flags else 'no'}" for flag in CPU_FLAGS)
    return (f"{cpu_model()}, {os.cpu_count()} CPUs; {present}; torch {torch.__version__} ({Config().dtype} by "
            f"`--torch-dtype auto`), faster-whisper {faster_whisper.__version__}, "
            f"ctranslate2 {ctranslate2.__version__}")


def report(clips: list[Clip], requests: int, rounds: list[list[AudioMeasurement]],
           phases: list[tuple[AudioMeasurement, dict[str, float]]], started: str) -> str:
    lines = [f"# Batchwise against faster-whisper, {started}", "", f"- {machine()}",
             "- clips (espeak-ng at 120 wpm): " + ", ".join(f"{c.name} {c.seconds:.1f} s" for c in clips)
             + f"; {requests} requests cycling through them ({sum(c.seconds for c in workload(clips, requests)):.0f} s "
             f"of audio), language en, beam 1, temperature fallback; {len(rounds)} rounds, alternating",
             f"- faster-whisper: cpu_threads={THREADS}, the embedded CTranslate2 tiny.en folder; Batchwise: "
             "`--serving-type whisper` with the flags named, streaming over HTTP", "",
             *summary(rounds, clips, requests), "", "## Where the server's time went (last round)", ""]
    for measurement, seconds in phases:
        lines += [*breakdown(measurement, dict(seconds)), ""]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = speech_parser("Batchwise whisper server against faster-whisper.", "--peers-only")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of every configuration, alternating (default 2)")
    parser.add_argument("--skip-peers", action="store_true", help="measure the servers only")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.peers_only:
        clips = [Clip(**c) for c in json.loads(args.clips)]
        Path(args.peers_only).write_text(json.dumps([asdict(m) for m in faster_whisper_runs(clips, args.requests)]))
        return
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    RESULTS.mkdir(parents=True, exist_ok=True)
    env = process_env(os.environ.get("MKL_CBWR", DEFAULT_MKL_CBWR))
    configurations = [shlex.split(text) for text in args.server_args or [""]]
    vad_settings = (True, False) if args.also_without_vad else (True,)
    rounds, phases = [], []
    with tempfile.TemporaryDirectory() as folder, contextlib.ExitStack() as servers:
        clips = make_clips(Path(folder))
        urls = [servers.enter_context(whisper_server(flags_of(words), env | env_of(words),
                                                     f"whisper-peers-{index}.log"))
                for index, words in enumerate(configurations)]
        for url in urls:
            run_level(url, clips[:1], 1)  # warm-up
        for _ in range(args.rounds):
            phases = [result for url, flags in zip(urls, configurations)
                      for result in measured_levels(url, flags, clips, args.requests, vad_settings, "Batchwise")]
            rounds.append([m for m, _ in phases] + ([] if args.skip_peers else run_peers(clips, args.requests, env)))
    text = report(clips, args.requests, rounds, phases, started)
    (RESULTS / "whisper-peers.md").write_text(text + "\n")
    print("\n" + text, flush=True)


if __name__ == "__main__":
    main()
