"""How right Whisper's times are: word error rate, and how far word and segment start times fall from where the
words were really spoken, on clips whose layout is known because they are built word by word (espeak-ng speaks
each word; the words of a sentence are joined with short gaps, sentences with pauses of 1 to 6 s, one clip
opening on 8 s of silence). Also audio seconds per wall second at 1 and 8 clients. The server, greedy and with
five beams, with the speech detector on and off, beside transformers' ASR pipeline with
return_timestamps="word" on the same weights, one clip at a time, in its own process after the server stops.

    python -m bench.whisper_timing
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import wave
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from openai import OpenAI

from bench.run_all import DEFAULT_MKL_CBWR, RESULTS, ROOT, cpu_model, process_env
from bench.whisper_bench import asr_pipeline
from tests.helpers.server_process import running_server
from tests.helpers.synthetic_speech import SENTENCES, speak, wav_bytes

RATE = 16000
WORD_GAP_SECONDS = 0.12
# (leading silence, sentences, pause after each sentence)
LAYOUTS = {"pauses of 1.5 s": (0.5, SENTENCES[:4], 1.5), "pauses of 6 s": (0.5, SENTENCES[4:7], 6.0),
           "8 s of silence first": (8.0, SENTENCES[7:10], 1.0)}
LEVELS = (1, 8)
REPEATS = 4  # each clip this many times per level
BEAMS = (1, 5)  # greedy, and beam search as OpenAI's transcribe runs it by default


@dataclass
class Word:
    word: str
    start: float
    end: float


@dataclass
class Clip:
    name: str
    path: str
    seconds: float
    words: list[Word]
    sentence_starts: list[float]


@dataclass
class Result:
    """What one system made of one clip."""
    words: list[Word]
    segment_starts: list[float] | None  # None: the system gives no segments beside its words


@dataclass
class Row:
    configuration: str
    wer: float
    word_start_error_s: float
    segment_start_error_s: float
    audio_per_wall: dict[str, float]


def normalised(word: str) -> str:
    return re.sub(r"[^\w']", "", word.lower())


def voiced(samples: np.ndarray) -> np.ndarray:
    loud = np.flatnonzero(np.abs(samples.astype(np.float32)) > 0.02 * max(np.abs(samples).max(), 1))
    return samples[loud[0]:loud[-1] + 1] if len(loud) else samples[:0]


def build_clip(name: str, folder: Path) -> Clip:
    lead, sentences, pause = LAYOUTS[name]
    parts, words, sentence_starts, clock = [np.zeros(round(lead * RATE), dtype="<i2")], [], [], lead
    for sentence in sentences:
        sentence_starts.append(clock)
        for word in sentence.split():
            samples, rate = speak(word)
            samples = voiced(samples if rate == RATE else resample(samples, rate))
            words.append(Word(word, clock, clock + len(samples) / RATE))
            parts += [samples, np.zeros(round(WORD_GAP_SECONDS * RATE), dtype="<i2")]
            clock += len(samples) / RATE + WORD_GAP_SECONDS
        parts.append(np.zeros(round(pause * RATE), dtype="<i2"))
        clock += pause
    audio = np.concatenate(parts)
    path = folder / f"{name.replace(' ', '-')}.wav"
    path.write_bytes(wav_bytes(audio, RATE))
    return Clip(name, str(path), len(audio) / RATE, words, sentence_starts)


def resample(samples: np.ndarray, rate: int) -> np.ndarray:
    positions = np.arange(0, len(samples), rate / RATE)
    return np.interp(positions, np.arange(len(samples)), samples.astype(np.float64)).astype("<i2")


def alignment(reference: list[str], hypothesis: list[str]) -> tuple[int, list[tuple[int, int]]]:
    """Levenshtein distance over words, and the (reference, hypothesis) index pairs that match."""
    rows, columns = len(reference) + 1, len(hypothesis) + 1
    cost = np.zeros((rows, columns), dtype=int)
    cost[:, 0], cost[0, :] = range(rows), range(columns)
    for i in range(1, rows):
        for j in range(1, columns):
            cost[i, j] = min(cost[i - 1, j] + 1, cost[i, j - 1] + 1,
                             cost[i - 1, j - 1] + (reference[i - 1] != hypothesis[j - 1]))
    matches, i, j = [], rows - 1, columns - 1
    while i > 0 and j > 0:
        if cost[i, j] == cost[i - 1, j - 1] + (reference[i - 1] != hypothesis[j - 1]):
            if reference[i - 1] == hypothesis[j - 1]:
                matches.append((i - 1, j - 1))
            i, j = i - 1, j - 1
        elif cost[i, j] == cost[i - 1, j] + 1:
            i -= 1
        else:
            j -= 1
    return int(cost[-1, -1]), matches[::-1]


def score(clips: list[Clip], results: list[Result]) -> tuple[float, float, float]:
    """Word error rate, mean absolute word start error and mean absolute sentence start error (seconds)."""
    errors = words = 0
    word_offsets, sentence_offsets = [], []
    for clip, result in zip(clips, results):
        reference = [normalised(w.word) for w in clip.words]
        hypothesis = [normalised(w.word) for w in result.words if normalised(w.word)]
        timed = [w for w in result.words if normalised(w.word)]
        distance, matches = alignment(reference, hypothesis)
        errors, words = errors + distance, words + len(reference)
        word_offsets += [abs(timed[h].start - clip.words[r].start) for r, h in matches]
        if result.segment_starts is not None:
            sentence_offsets += [min((abs(s - start) for s in result.segment_starts), default=clip.seconds)
                                 for start in clip.sentence_starts]
    return errors / words, float(np.mean(word_offsets or [np.nan])), float(np.mean(sentence_offsets or [np.nan]))


def server_result(client: OpenAI, clip: Clip, vad: bool) -> Result:
    with open(clip.path, "rb") as audio:
        reply = client.audio.transcriptions.create(
            file=audio, model="whisper-1", response_format="verbose_json", temperature=0,
            timestamp_granularities=["word", "segment"], extra_body={"vad_filter": str(vad).lower()})
    return Result([Word(w.word, w.start, w.end) for w in reply.words], [s.start for s in reply.segments])


def throughput(run_one, clips: list[Clip], concurrency: int) -> float:
    work = clips * REPEATS
    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(run_one, work))
    return sum(c.seconds for c in work) / (time.perf_counter() - started)


def server_rows(clips: list[Clip], env: dict[str, str], beams: int) -> list[Row]:
    rows, decoding = [], "greedy" if beams == 1 else f"beam {beams}"
    with running_server("--serving-type", "whisper", "--whisper-beam-size", str(beams), env=env,
                        log_path=RESULTS / f"whisper-timing-server-beam{beams}.log") as url:
        client = OpenAI(base_url=f"{url}/v1", api_key="-", max_retries=0, timeout=600)
        for vad in (True, False):
            results = [server_result(client, clip, vad) for clip in clips]
            speeds = {f"{level} client{'s' * (level > 1)}": throughput(lambda c: server_result(client, c, vad),
                                                                         clips, level) for level in LEVELS}
            rows.append(Row(f"Batchwise, {decoding}, VAD {'on' if vad else 'off'}", *score(clips, results), speeds))
            print(rows[-1], flush=True)
    return rows


def pipeline_row(clips: list[Clip]) -> Row:
    """transformers' pipeline on the converted model the server loads, one clip at a time."""
    recognizer = asr_pipeline()

    def run(clip: Clip) -> Result:
        with wave.open(clip.path) as wav:
            audio = np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2").astype(np.float32) / 32768
        output = recognizer({"raw": audio, "sampling_rate": RATE}, return_timestamps="word", chunk_length_s=30)
        words = [Word(chunk["text"].strip(), chunk["timestamp"][0], chunk["timestamp"][1] or clip.seconds)
                 for chunk in output["chunks"]]
        return Result(words, None)

    run(clips[0])  # warm-up
    results = [run(clip) for clip in clips]
    return Row("transformers pipeline, return_timestamps='word', sequential", *score(clips, results),
               {"1 client": throughput(run, clips, 1)})


def pipeline_in_own_process(clips: list[Clip], env: dict[str, str]) -> Row:
    with tempfile.NamedTemporaryFile(suffix=".json") as output:
        command = [sys.executable, "-m", "bench.whisper_timing", "--pipeline-only", output.name,
                   "--clips", json.dumps([asdict(c) for c in clips])]
        subprocess.run(command, cwd=ROOT, env=env, check=True)
        return Row(**json.loads(Path(output.name).read_text()))


def report(clips: list[Clip], rows: list[Row]) -> str:
    levels = [f"{level} client{'s' * (level > 1)}" for level in LEVELS]
    lines = [f"# Whisper timing benchmark, {datetime.datetime.now().isoformat(timespec='seconds')}", "",
             f"- {cpu_model()}, {os.cpu_count()} CPUs; whisper tiny.en (the embedded model), float32",
             "- clips, built word by word with espeak-ng (120 wpm, words joined with 0.12 s gaps): "
             + ", ".join(f"{c.name} ({c.seconds:.0f} s, {len(c.words)} words)" for c in clips),
             f"- throughput: every clip {REPEATS} times, verbose_json with word and segment timestamps",
             "- word start error: mean over the words the transcript got right (matched by the WER alignment); "
             "sentence start error: each sentence's start against the nearest segment start (the pipeline returns "
             "no segments beside its words)", "",
             "| configuration | WER | word start error (mean, s) | sentence start error (mean, s) | "
             + " | ".join(f"audio s / wall s, {level}" for level in levels) + " |",
             "|---|---|---|---|" + "---|" * len(levels)]
    for row in rows:
        speeds = " | ".join(f"{row.audio_per_wall[level]:.1f}" if level in row.audio_per_wall else "n/a"
                            for level in levels)
        sentence = "n/a" if np.isnan(row.segment_start_error_s) else f"{row.segment_start_error_s:.2f}"
        lines.append(f"| {row.configuration} | {row.wer:.1%} | {row.word_start_error_s:.2f} | {sentence} | {speeds} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="How right Batchwise's Whisper times are.")
    parser.add_argument("--pipeline-only", metavar="OUTPUT", help=argparse.SUPPRESS)
    parser.add_argument("--clips", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.pipeline_only:
        clips = [Clip(**{**c, "words": [Word(**w) for w in c["words"]]}) for c in json.loads(args.clips)]
        Path(args.pipeline_only).write_text(json.dumps(asdict(pipeline_row(clips))))
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    env = process_env(os.environ.get("MKL_CBWR", DEFAULT_MKL_CBWR))
    with tempfile.TemporaryDirectory() as folder:
        clips = [build_clip(name, Path(folder)) for name in LAYOUTS]
        rows = [row for beams in BEAMS for row in server_rows(clips, env, beams)]
        rows.append(pipeline_in_own_process(clips, env))
    text = report(clips, rows)
    (RESULTS / "whisper-timing.md").write_text(text + "\n")
    print("\n" + text, flush=True)


if __name__ == "__main__":
    main()
