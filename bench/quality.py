"""How far each engine configuration moves the embedded models' greedy output from transformers' own in float32.

    python -m bench.quality                                   # everything: about 50 min on 2 CPU cores
    python -m bench.quality --configs eager,compile --dtypes bfloat16 --prompts 16 --skip-whisper
    python -m bench.quality --json bench/results/quality.json # the raw numbers too

Chat: the embedded SmolLM2-135M-Instruct answers the fixed prompts of bench/quality_prompts.py (rendered with
its chat template, as /v1/chat/completions renders them) greedily, up to --max-tokens each, all submitted at
once to one engine built as the server builds it (load_model, build_engine, the decode step warmed up) with a
batch of --batch-size rows, so they batch together and long prompts are cut into chunks beside decoding rows.
The reference is transformers' `generate` (greedy, stopping at EOS like the engine) on the same weights loaded
by `AutoModelForCausalLM.from_pretrained(..., dtype=torch.float32, attn_implementation="sdpa")`, one prompt at
a time; the same `generate` in bfloat16 is a row of its own: how far bfloat16 itself moves from float32, the
floor any bfloat16 configuration can reach.

Columns of the chat table:
- identical: share of completions whose tokens equal the float32 reference's.
- first divergence: among the others, the mean index of the first token that differs (where one completion is
  a prefix of the other: the shorter one's length).
- mean gap / max gap: each completion token the configuration wrote is teacher-forced through the float32
  reference (one forward over prompt + completion); its gap is the reference's best logprob at that position
  minus its logprob of that token (0 when the token is the reference's argmax). Mean and max over all tokens,
  in nats: how much worse than the reference's own choice the configuration's choices are.
- mean |Δ logprob|: mean |logprob the configuration reported - the reference's logprob| over the same tokens.
  In float32 it measures the configuration's numerics; in bfloat16 it includes bfloat16's own rounding.
- argmax tokens: share of those tokens that are the reference's own argmax (gap 0): per-token agreement, which
  one early flip does not decide for the rest of a completion as it does for "identical".
- run s: seconds to answer every prompt (after the warm-up, which compiles the compiled configurations).

Speech: the embedded Whisper tiny.en transcribes espeak-ng clips of known sentences (tests/helpers/
synthetic_speech.py, 120 words per minute) through the in-process TranscriptionService, as the server builds it
for `--serving-type whisper` (voice activity detection, temperature fallback: a non-streamed request at
temperature 0), all clips at once. The reference row is transformers' WhisperForConditionalGeneration.generate
in float32 (greedy, with timestamps, as the engine decodes). Columns: WER (word error rate against the spoken
text, case and punctuation removed: word-level edit distance over all clips' words), identical (share of
transcripts equal to the float32 reference's), retried (windows decoded again at a higher temperature because
they read badly) and run s.

Each group of configurations that share a loaded model (dtype, --int8/--hqq, and MKL's mode: batch-invariant
servers run with MKL_CBWR=AUTO,STRICT as main.py sets it, the others with AUTO) runs in a process of its own,
so compiled graphs, dynamo's settings and MKL's mode never leak from one configuration to another, and a crash
costs only that group's rows. A configuration Config.validate() refuses (int8 on CUDA) is listed as skipped.
Every engine's static slots hold --static-cache-decoder-max-length = the longest prompt plus --max-tokens
(at least 256, the default), so that the long prompts fit the static configurations.
"""

from __future__ import annotations

import os

os.environ.setdefault("MKL_CBWR", "AUTO")  # as main.py leaves it without --batch-invariant; before torch

import argparse  # noqa: E402
import asyncio  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict, dataclass, field, replace  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable  # noqa: E402

import torch  # noqa: E402
import transformers  # noqa: E402

from bench.quality_prompts import PROMPTS  # noqa: E402
from bench.report import cpu_model  # noqa: E402
from config import Config, ConfigError, cpu_flags  # noqa: E402

CHAT_CONFIGS: dict[str, dict[str, Any]] = {
    "eager": {},
    "static": {"static_cache": True},
    "compile": {"torch_compile": True},  # compiling turns the static cache on
    "int8": {"int8": True},
    "int8+compile": {"int8": True, "torch_compile": True},
    "hqq": {"hqq": True},
    "hqq+compile": {"hqq": True, "torch_compile": True},
    "batch-invariant": {"batch_invariant": True},
    "batch-invariant+static": {"batch_invariant": True, "static_cache": True},
    "no-prefix-cache": {"prefix_caching": False},
    "chunked-16": {"max_num_batched_tokens": 16},
}
ROOT = Path(__file__).resolve().parent.parent
WHISPER_CONFIGS = ("eager", "static", "compile", "int8", "hqq")
DTYPES = ("float32", "bfloat16")
REFERENCE = "transformers generate"
CPU_FLAGS = ("avx2", "avx512_bf16", "amx_bf16", "avx512_vnni")
CLIP_SENTENCES = 2  # sentences per clip: about 12 s of speech, one 30 s window
CLIP_PAUSE_S = 1.0
# a configuration this far below the median of its neighbours (same dtype and quantisation) is worth a look
IDENTICAL_DROP = 0.15
GAP_RATIO, GAP_FLOOR = 3.0, 0.02  # ...or whose mean gap is 3x theirs and at least 0.02 nats more
WER_RISE = 0.05


def log(message: str) -> None:
    print(f"quality: {message}", file=sys.stderr, flush=True)


# ---- what the engines and the reference produce -------------------------------------------------------------

@dataclass
class Completion:
    tokens: list[int]
    logprobs: list[float]
    error: str = ""


@dataclass
class Heard:
    text: str
    retried: int = 0  # windows decoded again, hotter
    error: str = ""


@dataclass
class Run:
    """One configuration's outputs, in prompt (or clip) order."""
    configuration: str
    dtype: str
    outputs: list[Any] = field(default_factory=list)  # Completion (chat) or Heard (speech)
    seconds: float = 0.0
    warm_up_seconds: float = 0.0
    recompiles: int = 0  # frames dynamo compiled while answering, after the warm-up (there should be none)
    error: str = ""  # the whole configuration failed, or was not accepted

    @staticmethod
    def from_json(data: dict[str, Any], output: type) -> Run:
        return Run(**{**data, "outputs": [output(**item) for item in data["outputs"]]})


@dataclass
class Job:
    """Configurations that share one loaded model, for one worker process."""
    kind: str  # "chat" or "whisper"
    dtype: str
    configurations: list[str]
    batch_size: int
    slot_tokens: int = 256
    max_tokens: int = 0
    prompts: list[list[int]] = field(default_factory=list)  # chat: token ids
    clips: list[str] = field(default_factory=list)  # whisper: WAV paths

    @property
    def mkl_mode(self) -> str:
        return "AUTO,STRICT" if self.config(self.configurations[0]).batch_invariant else "AUTO"

    def config(self, name: str) -> Config:
        overrides = {"torch_compile": False, **CHAT_CONFIGS[name]}  # each configuration names its decode path
        return Config(serving_type=self.kind, torch_dtype=self.dtype, continuous_batching_batch_size=self.batch_size,
                      max_concurrent=max(100, len(self.prompts) + len(self.clips)),
                      static_cache_decoder_max_length=self.slot_tokens, loglevel="WARNING", **overrides)


# ---- planning: which configurations run, grouped by the model they load ---------------------------------------

def group_key(config: Config) -> tuple:
    return config.dtype_choice()[0], config.int8, config.hqq, config.batch_invariant


def plan(template: Job, names: list[str], dtypes: list[str]) -> tuple[list[Job], list[Run]]:
    """Jobs (compiled configurations last in each, as nothing else then runs beside their graphs), and the runs of
    configurations Config.validate() refuses."""
    groups: dict[tuple, Job] = {}
    refused = []
    for dtype in dtypes:
        for name in names:
            job = replace(template, dtype=dtype, configurations=[name])
            config = job.config(name)
            try:
                config.validate()
            except ConfigError as error:
                refused.append(Run(name, dtype, error=f"not accepted: {error}"))
                continue
            groups.setdefault(group_key(config), replace(job, configurations=[])).configurations.append(name)
    for job in groups.values():
        job.configurations.sort(key=lambda name: CHAT_CONFIGS[name].get("torch_compile", False))
    return list(groups.values()), refused


def run_jobs(jobs: list[Job], output: type) -> list[Run]:
    return [run for job in jobs for run in run_worker(job, output)]


def run_worker(job: Job, output: type) -> list[Run]:
    """The job in a process of its own, with MKL's mode as the server would set it."""
    log(f"{job.kind} {job.dtype}: {', '.join(job.configurations)} (MKL_CBWR={job.mkl_mode})")
    env = {**os.environ, "MKL_CBWR": job.mkl_mode,
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    with tempfile.TemporaryDirectory() as folder:
        job_path, result_path = Path(folder) / "job.json", Path(folder) / "runs.json"
        job_path.write_text(json.dumps(asdict(job)))
        command = [sys.executable, "-m", "bench.quality", "--worker", str(job_path), str(result_path)]
        finished = subprocess.run(command, cwd=ROOT, env=env, stdout=sys.stderr)
        if finished.returncode != 0 or not result_path.exists():
            return [Run(name, job.dtype, error=f"worker process exited with code {finished.returncode}")
                    for name in job.configurations]
        return [Run.from_json(item, output) for item in json.loads(result_path.read_text())]


# ---- the worker: engines built as the server builds them ------------------------------------------------------

def worker(job_path: str, result_path: str) -> None:
    logging.basicConfig(level="WARNING", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    transformers.utils.logging.disable_progress_bar()
    job = Job(**json.loads(Path(job_path).read_text()))
    runs = asyncio.run(run_chat_job(job) if job.kind == "chat" else run_whisper_job(job))
    Path(result_path).write_text(json.dumps([asdict(run) for run in runs]))


async def answered(job: Job, name: str, loaded: Any, build: Callable, answer: Callable) -> Run:
    """One configuration: its engine built on the torch thread, warmed up and started as the server starts it,
    answer(job, loaded, config, engine) -> its outputs; then stopped and its compiled graphs dropped (the server
    trusts warm graphs, sound for one model in one process)."""
    from batching.torch_thread import on_torch_thread
    from serving.startup import StartupProgress, warm_up
    config, started = job.config(name), time.perf_counter()
    engine = await on_torch_thread(build, loaded, config)
    try:
        await warm_up(engine, StartupProgress())
        engine.start()
        ready, frames = time.perf_counter(), compiled_frames()
        outputs = await answer(job, loaded, config, engine)
        return Run(name, job.dtype, outputs, time.perf_counter() - ready, ready - started,
                   recompiles=compiled_frames() - frames)
    finally:
        await engine.stop()
        if config.torch_compile:
            torch.compiler.set_stance("default")
            torch._dynamo.reset()


def compiled_frames() -> int:
    from torch._dynamo.utils import counters
    return counters["frames"]["total"]


async def run_job(job: Job, load: Callable, build: Callable, answer: Callable) -> list[Run]:
    """Each configuration of the job on the one model the job loads."""
    from batching.torch_thread import on_torch_thread
    runs, loaded = [], None
    for name in job.configurations:
        try:
            loaded = loaded or await on_torch_thread(load, job.config(name))
            run = await answered(job, name, loaded, build, answer)
            log(f"{job.kind} {name} {job.dtype}: warm-up {run.warm_up_seconds:.1f} s, answers {run.seconds:.1f} s")
        except Exception as error:  # a configuration that fails is a row that says so
            logging.getLogger("bench.quality").exception("%s %s failed", name, job.dtype)
            run = Run(name, job.dtype, error=f"{type(error).__name__}: {error}")
        runs.append(run)
    return runs


async def run_chat_job(job: Job) -> list[Run]:
    from model_manager import build_engine, load_model
    return await run_job(job, load_model, build_engine, answer_prompts)


async def answer_prompts(job: Job, loaded: Any, config: Config, engine: Any) -> list[Completion]:
    from batching import SamplingParams
    params = SamplingParams(max_tokens=job.max_tokens, temperature=0.0, logprobs=0)
    return list(await asyncio.gather(*(complete(engine, prompt, params) for prompt in job.prompts)))


async def complete(engine: Any, prompt: list[int], params: Any) -> Completion:
    completion = Completion([], [])
    try:
        async for delta in engine.stream(engine.add(prompt, params)):
            completion.tokens += delta.token_ids
            completion.logprobs += [item.logprob for item in delta.logprobs]
            completion.error = delta.error
    except Exception as error:
        completion.error = f"{type(error).__name__}: {error}"
    return completion


async def run_whisper_job(job: Job) -> list[Run]:
    from speech.loader import build_whisper_engine, load_whisper
    return await run_job(job, load_whisper, build_whisper_engine, transcribe_clips)


async def transcribe_clips(job: Job, loaded: Any, config: Config, engine: Any) -> list[Heard]:
    from serving.transcription import TranscriptionService
    service = TranscriptionService(engine, loaded, config.served_names(loaded.name), config.whisper_beam_size)
    return list(await asyncio.gather(*(transcribe(service, Path(clip).read_bytes(), f"clip-{index}")
                                       for index, clip in enumerate(job.clips))))


async def transcribe(service: Any, audio: bytes, request_id: str) -> Heard:
    """As a non-streamed request at temperature 0 (voice activity detection, temperature fallback)."""
    from serving.transcription import TranscriptionOptions
    try:
        job = await service.start(audio, TranscriptionOptions(), request_id)
        async for _ in job.deltas():
            pass
    except Exception as error:
        return Heard("", error=f"{type(error).__name__}: {error}")
    segments = job.transcript.segments
    return Heard(job.transcript.text, len({segment.seek for segment in segments if segment.temperature > 0}))


# ---- the chat reference: transformers in float32 ---------------------------------------------------------------

class ChatReference:
    """transformers' own model: greedy `generate`, and teacher forcing of any completion through float32."""

    def __init__(self, source: Path | str, device: str) -> None:
        from model_manager import LoadedModel
        self.source, self.device = source, device
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(source)
        self.model = self.load(torch.float32)
        self.eos = sorted(LoadedModel(self.model, self.tokenizer, "reference", 0).eos_token_ids)  # as the engine's
        self.forced: dict[tuple, tuple[list[float], list[float]]] = {}

    def load(self, dtype: torch.dtype) -> transformers.PreTrainedModel:
        model = transformers.AutoModelForCausalLM.from_pretrained(self.source, dtype=dtype, attn_implementation="sdpa")
        return model.to(self.device).eval()

    def render(self, messages: list[dict[str, str]]) -> list[int]:
        """As the server renders a chat request for a decoder model."""
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self.tokenizer(text, add_special_tokens=False).input_ids

    @torch.inference_mode()
    def generate(self, model: transformers.PreTrainedModel, prompt: list[int], max_tokens: int) -> Completion:
        ids = torch.tensor([prompt], device=self.device)
        settings = transformers.GenerationConfig(do_sample=False, max_new_tokens=max_tokens, eos_token_id=self.eos,
                                                 pad_token_id=self.eos[0], output_logits=True,
                                                 return_dict_in_generate=True)
        output = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=settings)
        tokens = output.sequences[0, len(prompt):].tolist()
        logprobs = [torch.log_softmax(step[0].float(), -1)[token].item() for step, token in zip(output.logits, tokens)]
        return Completion(tokens, logprobs)

    def run(self, dtype: str, prompts: list[list[int]], max_tokens: int) -> Run:
        log(f"transformers generate {dtype}: {len(prompts)} prompts")
        model = self.model if dtype == "float32" else self.load(getattr(torch, dtype))
        started = time.perf_counter()
        outputs = [self.generate(model, prompt, max_tokens) for prompt in prompts]
        return Run(REFERENCE, dtype, outputs, time.perf_counter() - started)

    @torch.inference_mode()
    def teacher_forced(self, prompt: list[int], tokens: list[int]) -> tuple[list[float], list[float]]:
        """For each token: (the reference's best logprob minus its logprob of the token, its logprob of the token)."""
        key = (tuple(prompt), tuple(tokens))
        if key not in self.forced:
            ids = torch.tensor([prompt + tokens], device=self.device)
            logprobs = torch.log_softmax(self.model(ids).logits[0, len(prompt) - 1:-1].float(), -1)
            chosen = logprobs.gather(1, torch.tensor(tokens, device=self.device)[:, None])[:, 0]
            self.forced[key] = ((logprobs.max(-1).values - chosen).tolist(), chosen.tolist())
        return self.forced[key]


# ---- scores ----------------------------------------------------------------------------------------------------

@dataclass
class Row:
    """What every row of a table says about its run."""
    configuration: str
    dtype: str
    seconds: float = 0.0
    warm_up_seconds: float = 0.0
    recompiles: int = 0
    failed: int = 0  # prompts or clips that ended in an error
    error: str = ""

    @classmethod
    def of(cls, run: Run, **scores: Any) -> Row:
        return cls(run.configuration, run.dtype, run.seconds, run.warm_up_seconds, run.recompiles,
                   sum(bool(output.error) for output in run.outputs), run.error, **scores)


@dataclass
class ChatRow(Row):
    identical: float = float("nan")
    first_divergence: float = float("nan")
    mean_gap: float = float("nan")
    max_gap: float = float("nan")
    mean_logprob_error: float = float("nan")
    argmax_agreement: float = float("nan")  # share of tokens that are the reference's argmax (gap 0)


@dataclass
class SpeechRow(Row):
    wer: float = float("nan")
    identical: float = float("nan")
    retried: int = 0


def first_divergence(tokens: list[int], expected: list[int]) -> int | None:
    """The index of the first token that differs, the shorter length where one is the other's prefix, or None."""
    if tokens == expected:
        return None
    return next((i for i, (a, b) in enumerate(zip(tokens, expected)) if a != b), min(len(tokens), len(expected)))


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def score_chat(run: Run, reference: list[Completion], prompts: list[list[int]], scorer: ChatReference) -> ChatRow:
    if run.error:
        return ChatRow.of(run)
    divergences = [first_divergence(c.tokens, r.tokens) for c, r in zip(run.outputs, reference)]
    gaps, errors = [], []
    for prompt, completion in zip(prompts, run.outputs):
        if completion.tokens:
            token_gaps, reference_logprobs = scorer.teacher_forced(prompt, completion.tokens)
            gaps += token_gaps
            errors += [abs(a - b) for a, b in zip(completion.logprobs, reference_logprobs)]
    return ChatRow.of(run, identical=divergences.count(None) / len(divergences),
                      first_divergence=mean([d for d in divergences if d is not None]), mean_gap=mean(gaps),
                      max_gap=max(gaps, default=float("nan")), mean_logprob_error=mean(errors),
                      argmax_agreement=mean([float(gap == 0) for gap in gaps]))


def words(text: str) -> list[str]:
    """Lower case, punctuation removed (apostrophes inside words kept)."""
    return re.sub(r"[^a-z0-9' ]+", " ", text.lower()).replace(" '", " ").replace("' ", " ").split()


def edit_distance(hypothesis: list[str], reference: list[str]) -> int:
    """Word-level Levenshtein distance: substitutions, insertions and deletions."""
    previous = list(range(len(reference) + 1))
    for i, word in enumerate(hypothesis, 1):
        current = [i]
        for j, expected in enumerate(reference, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (word != expected)))
        previous = current
    return previous[-1]


def word_error_rate(hypotheses: list[str], references: list[str]) -> float:
    edits = sum(edit_distance(words(h), words(r)) for h, r in zip(hypotheses, references))
    return edits / sum(len(words(r)) for r in references)


def score_speech(run: Run, reference: list[Heard], spoken: list[str]) -> SpeechRow:
    if run.error:
        return SpeechRow.of(run)
    return SpeechRow.of(run, wer=word_error_rate([h.text for h in run.outputs], spoken),
                        identical=mean([float(h.text.split() == r.text.split())
                                        for h, r in zip(run.outputs, reference)]),
                        retried=sum(h.retried for h in run.outputs))


# ---- notes: failures, recompilations, configurations well below their neighbours -------------------------------

def quantisation(name: str) -> str:
    return "int8" if CHAT_CONFIGS[name].get("int8") else "hqq" if CHAT_CONFIGS[name].get("hqq") else "none"


def neighbours(row: Row, rows: list[Row]) -> list[Row]:
    """The other engine configurations that ran in the same dtype and quantisation."""
    if row.configuration == REFERENCE:
        return []
    return [other for other in rows if other is not row and other.configuration != REFERENCE and not other.error
            and other.dtype == row.dtype and quantisation(other.configuration) == quantisation(row.configuration)]


def problems(row: Row, unit: str) -> list[str]:
    name = f"{row.configuration} {row.dtype}"
    if row.error:
        return [f"- {name}: {row.error}"]
    notes = [f"- **{name}**: {row.failed} {unit} ended in an error (see --json)"] if row.failed else []
    if row.recompiles:
        notes.append(f"- **{name}**: dynamo compiled {row.recompiles} frames while answering, after the warm-up "
                     "had compiled every bucket: a recompilation while serving")
    return notes


def below(row: Row, peers: list[Row], what: str, value: Callable[[Row], float], worse: Callable[[float, float], bool],
          spec: str) -> list[str]:
    """A note if the row's value is worse than its neighbours' median."""
    typical = statistics.median(value(peer) for peer in peers)
    if not worse(value(row), typical):
        return []
    return [f"- **{row.configuration} {row.dtype}**: {what} {format(value(row), spec)} against "
            f"{format(typical, spec)} for its neighbours ({', '.join(p.configuration for p in peers)}): "
            "a bug to find, not a number to report"]


def chat_notes(rows: list[ChatRow]) -> list[str]:
    notes = []
    for row in rows:
        notes += problems(row, "prompts")
        peers = neighbours(row, rows) if not row.error else []
        if peers:
            notes += (below(row, peers, "identical", lambda r: r.identical, lambda v, t: v < t - IDENTICAL_DROP, ".0%")
                      or below(row, peers, "mean gap", lambda r: r.mean_gap,
                               lambda v, t: v > max(GAP_RATIO * t, t + GAP_FLOOR), ".4f"))
    return notes


def speech_notes(rows: list[SpeechRow]) -> list[str]:
    notes = []
    for row in rows:
        notes += problems(row, "clips")
        peers = neighbours(row, rows) if not row.error else []
        if peers:
            notes += below(row, peers, "WER", lambda r: r.wer, lambda v, t: v > t + WER_RISE, ".1%")
        if row.retried:
            notes.append(f"- {row.configuration} {row.dtype}: {row.retried} windows read badly at temperature 0 and "
                         "were decoded again hotter (sampled: that row varies from run to run)")
    return notes


# ---- output -------------------------------------------------------------------------------------------------------

def number(value: float, spec: str) -> str:
    return "n/a" if value != value else format(value, spec)


def markdown(header: list[str], lines: list[list[str]]) -> str:
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
                      *("| " + " | ".join(cells) + " |" for cells in lines)])


def failed(row: Any, columns: int) -> list[str]:
    return ["skipped" if row.error.startswith("not accepted") else "failed", *["-"] * (columns - 1)]


def chat_table(rows: list[ChatRow]) -> str:
    header = ["configuration", "dtype", "identical", "first divergence", "mean gap", "max gap", "mean \\|Δ logprob\\|",
              "argmax tokens", "run s"]
    return markdown(header, [[r.configuration, r.dtype, *(failed(r, 7) if r.error else [
        number(r.identical, ".0%"), number(r.first_divergence, ".1f"), number(r.mean_gap, ".2g"),
        number(r.max_gap, ".2g"), number(r.mean_logprob_error, ".2g"), number(r.argmax_agreement, ".1%"),
        f"{r.seconds:.1f}"])] for r in rows])


def speech_table(rows: list[SpeechRow]) -> str:
    header = ["configuration", "dtype", "WER", "identical", "retried", "run s"]
    return markdown(header, [[r.configuration, r.dtype, *(failed(r, 4) if r.error else [
        number(r.wer, ".1%"), number(r.identical, ".0%"), str(r.retried), f"{r.seconds:.1f}"])] for r in rows])


def machine() -> dict[str, Any]:
    flags = cpu_flags()
    return {"cpu": cpu_model(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cpu_flags": {flag: flag in flags for flag in CPU_FLAGS}, "torch": torch.__version__,
            "transformers": transformers.__version__, "device": Config().device}


def describe(info: dict[str, Any]) -> str:
    flags = ", ".join(f"{flag} {'yes' if present else 'no'}" for flag, present in info["cpu_flags"].items())
    return (f"- {info['cpu']}, {info['cpus']} CPUs ({info['torch_threads']} torch threads), device {info['device']}; "
            f"{flags}\n- torch {info['torch']}, transformers {info['transformers']}")


def ordered(rows: list[Any], names: list[str]) -> list[Any]:
    """Reference rows first, then configurations in the order asked for, float32 before bfloat16."""
    place = {name: index for index, name in enumerate([REFERENCE, *names])}
    return sorted(rows, key=lambda row: (place[row.configuration], row.dtype != "float32"))


# ---- the two parts -------------------------------------------------------------------------------------------

def chat_part(args: argparse.Namespace) -> dict[str, Any]:
    from model_manager import model_source
    names = [name for name in args.configs if name in CHAT_CONFIGS]
    scorer = ChatReference(model_source(Config()), Config().device)
    prompts = [scorer.render(messages) for messages in PROMPTS[:args.prompts]]
    references = [scorer.run(dtype, prompts, args.max_tokens) for dtype in DTYPES
                  if dtype == "float32" or dtype in args.dtypes]
    slots = max(256, max(map(len, prompts)) + args.max_tokens)
    jobs, refused = plan(Job("chat", "", [], args.batch_size, slots, args.max_tokens, prompts), names, args.dtypes)
    runs = [*references, *run_jobs(jobs, Completion), *refused]
    log(f"teacher-forcing {sum(len(r.outputs) for r in runs)} completions through the float32 reference")
    rows = ordered([score_chat(run, references[0].outputs, prompts, scorer) for run in runs], names)
    print(f"\n## Chat: SmolLM2-135M-Instruct, {len(prompts)} prompts ({sum(map(len, prompts))} prompt tokens, "
          f"{min(map(len, prompts))}-{max(map(len, prompts))} each), greedy, up to {args.max_tokens} tokens, "
          f"batch {args.batch_size}, static slots of {slots} tokens, MKL_CBWR AUTO (AUTO,STRICT when batch-invariant)"
          f"\n\n{chat_table(rows)}\n", flush=True)
    notes = chat_notes(rows)
    print("\n".join(notes or ["No configuration falls well below its neighbours."]), flush=True)
    return {"rows": [asdict(row) for row in rows], "runs": [asdict(run) for run in runs], "notes": notes,
            "prompt_tokens": prompts}


def speech_part(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    from tests.helpers.synthetic_speech import SENTENCES, espeak_available, spoken_clip
    if not espeak_available():
        print("\n## Speech\n\nskipped: espeak-ng is not installed (apt-get install espeak-ng)", flush=True)
        return {"skipped": "espeak-ng is not installed"}
    names = [name for name in args.configs if name in WHISPER_CONFIGS]
    groups = [SENTENCES[i:i + CLIP_SENTENCES] for i in range(0, len(SENTENCES), CLIP_SENTENCES)]
    spoken = [" ".join(group) for group in groups]
    clips = [folder / f"clip-{index}.wav" for index in range(len(groups))]
    for clip, group in zip(clips, groups):
        clip.write_bytes(spoken_clip(group, CLIP_PAUSE_S))
    references = [whisper_reference(dtype, clips) for dtype in DTYPES if dtype == "float32" or dtype in args.dtypes]
    jobs, refused = plan(Job("whisper", "", [], args.batch_size, clips=list(map(str, clips))), names, args.dtypes)
    runs = [*references, *run_jobs(jobs, Heard), *refused]
    rows = ordered([score_speech(run, references[0].outputs, spoken) for run in runs], names)
    print(f"\n## Speech: Whisper tiny.en, {len(clips)} espeak-ng clips ({sum(len(words(s)) for s in spoken)} words), "
          f"transcribed together through TranscriptionService\n\n{speech_table(rows)}\n", flush=True)
    notes = speech_notes(rows)
    print("\n".join(notes or ["No configuration falls well below its neighbours."]), flush=True)
    return {"rows": [asdict(row) for row in rows], "runs": [asdict(run) for run in runs], "notes": notes,
            "spoken": spoken}


@torch.inference_mode()
def whisper_reference(dtype: str, clips: list[Path]) -> Run:
    """transformers' WhisperForConditionalGeneration.generate, greedy with timestamps, one clip at a time."""
    from speech.audio import SAMPLE_RATE, decode_audio
    from speech.loader import whisper_source
    log(f"transformers Whisper generate {dtype}: {len(clips)} clips")
    config = Config(serving_type="whisper")
    source = whisper_source(config)
    processor = transformers.WhisperProcessor.from_pretrained(source)
    model = transformers.WhisperForConditionalGeneration.from_pretrained(source, dtype=getattr(torch, dtype),
                                                                         attn_implementation="sdpa")
    model.to(config.device).eval()
    started, outputs = time.perf_counter(), []
    for clip in clips:
        features = processor(decode_audio(clip.read_bytes()), sampling_rate=SAMPLE_RATE, return_tensors="pt")
        tokens = model.generate(features.input_features.to(config.device, model.dtype), return_timestamps=True)
        outputs.append(Heard(processor.batch_decode(tokens, skip_special_tokens=True)[0].strip()))
    return Run(REFERENCE, dtype, outputs, time.perf_counter() - started)


# ---- command line --------------------------------------------------------------------------------------------

def names_list(choices: list[str]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        names = [name.strip() for name in text.split(",") if name.strip()]
        unknown = [name for name in names if name not in choices]
        if unknown or not names:
            raise argparse.ArgumentTypeError(f"unknown {', '.join(unknown) or 'nothing'}; choose among "
                                             f"{', '.join(choices)}")
        return names
    return parse


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Output quality of each engine configuration against transformers "
                                                 "in float32, on the embedded chat and speech models.")
    parser.add_argument("--configs", type=names_list(list(CHAT_CONFIGS)), default=list(CHAT_CONFIGS),
                        help=f"comma-separated among {', '.join(CHAT_CONFIGS)} (speech runs those among "
                             f"{', '.join(WHISPER_CONFIGS)}; default all)")
    parser.add_argument("--dtypes", type=names_list(list(DTYPES)), default=list(DTYPES),
                        help="comma-separated among float32, bfloat16 (default both)")
    parser.add_argument("--prompts", type=int, default=len(PROMPTS), help=f"the first N prompts (of {len(PROMPTS)})")
    parser.add_argument("--max-tokens", type=int, default=48, help="completion tokens per prompt (default 48)")
    parser.add_argument("--batch-size", type=int, default=8, help="the engines' --continuous-batching-batch-size "
                        "(default 8: compiling fewer buckets)")
    parser.add_argument("--skip-chat", action="store_true", help="only the speech part")
    parser.add_argument("--skip-whisper", action="store_true", help="only the chat part")
    parser.add_argument("--json", type=Path, help="write the raw numbers (every row, every completion) here")
    parser.add_argument("--worker", nargs=2, metavar=("JOB", "RESULT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not 1 <= args.prompts <= len(PROMPTS):
        parser.error(f"--prompts must be between 1 and {len(PROMPTS)}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        return worker(*args.worker)
    started = time.perf_counter()
    transformers.utils.logging.disable_progress_bar()
    info = machine()
    print(f"# Batchwise quality against transformers in float32\n\n{describe(info)}", flush=True)
    result: dict[str, Any] = {"machine": info, "settings": {k: v for k, v in vars(args).items() if k != "worker"}}
    if not args.skip_chat:
        result["chat"] = chat_part(args)
    if not args.skip_whisper:
        with tempfile.TemporaryDirectory() as folder:
            result["speech"] = speech_part(args, Path(folder))
    result["total_seconds"] = time.perf_counter() - started
    print(f"\nTotal time: {result['total_seconds'] / 60:.1f} min", flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
