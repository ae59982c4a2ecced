"""Prometheus metrics through prometheus-client: what requests and the engine did, named batchwise_* and
labelled with the served model; the measures vLLM also has are reported under its names and labels too
(vllm:*, model_name and engine), so that a vLLM dashboard, autoscaler or gateway reads this server unchanged.
Request timings are observed when a choice finishes; engine gauges are read when /metrics is scraped."""

from __future__ import annotations

from typing import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.registry import Collector

from batching import Engine

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)
VLLM_LABELS = ("model_name", "engine")
ENGINE = "0"  # vLLM numbers its engine processes; this server has one engine


class EngineGauges(Collector):
    """Running and waiting sequences and KV memory, as they are at scrape time; and where the engine drafts, what
    speculative decoding did: the acceptance rate is accepted / draft tokens, the tokens a verified row emits per
    step 1 + accepted / verification steps."""

    def __init__(self, model: Callable[[], str], engine: Callable[[], Engine | None],
                 kv_tokens: Callable[[], tuple[int, int] | None]) -> None:
        self.model, self.engine, self.kv_tokens = model, engine, kv_tokens

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        engine = self.engine()
        if engine is None:
            return
        stats, model = engine.stats(), self.model()
        yield from twin("batchwise_sequences_running", "vllm:num_requests_running", "sequences in the running batch",
                        model, stats.running)
        yield from twin("batchwise_sequences_waiting", "vllm:num_requests_waiting", "sequences queued for admission",
                        model, stats.waiting)
        kv = self.kv_tokens()
        if kv is not None:
            used, budget = kv
            yield labelled("batchwise_kv_tokens_used", "KV positions held by sequences and the prefix cache", model,
                           used)
            yield labelled("batchwise_kv_tokens_budget", "KV positions the budget holds", model, budget)
            yield vllm_labelled("vllm:kv_cache_usage_perc", "KV cache usage, 1 is full", model,
                                used / budget if budget else 0.0)
        if stats.drafts is not None:
            drafts = stats.drafts
            yield from twin("batchwise_spec_decode_draft_tokens", "vllm:spec_decode_num_draft_tokens",
                            "draft tokens proposed for verification", model, drafts.proposed, CounterMetricFamily)
            yield from twin("batchwise_spec_decode_accepted_tokens", "vllm:spec_decode_num_accepted_tokens",
                            "draft tokens the model accepted", model, drafts.accepted, CounterMetricFamily)
            yield from twin("batchwise_spec_decode_verification_steps", "vllm:spec_decode_num_drafts",
                            "rows that verified a draft, one per row and step", model, drafts.verifications,
                            CounterMetricFamily)


MetricFamily = type[GaugeMetricFamily | CounterMetricFamily]


def labelled(name: str, help_text: str, model: str, value: float, kind: MetricFamily = GaugeMetricFamily
             ) -> GaugeMetricFamily:
    family = kind(name, help_text, labels=["model"])
    family.add_metric([model], value)
    return family


def vllm_labelled(name: str, help_text: str, model: str, value: float, kind: MetricFamily = GaugeMetricFamily
                  ) -> GaugeMetricFamily:
    family = kind(name, help_text, labels=VLLM_LABELS)
    family.add_metric([model, ENGINE], value)
    return family


def twin(ours: str, vllms: str, help_text: str, model: str, value: float, kind: MetricFamily = GaugeMetricFamily
         ) -> Iterator[GaugeMetricFamily]:
    """One scrape-time value under our name and vLLM's."""
    yield labelled(ours, help_text, model, value, kind)
    yield vllm_labelled(vllms, help_text, model, value, kind)


class Twin:
    """A counter or histogram under our name (label model) and vLLM's (labels model_name, engine), fed once."""

    def __init__(self, kind: type[Counter | Histogram], ours: str | None, vllms: str, help_text: str,
                 registry: CollectorRegistry, **options) -> None:
        self.ours = kind(ours, help_text, ["model"], registry=registry, **options) if ours else None
        self.vllm = kind(vllms, help_text, VLLM_LABELS, registry=registry, **options)
        self.method = "observe" if kind is Histogram else "inc"

    def add(self, model: str, value: float) -> None:
        for metric in self.children(model):
            getattr(metric, self.method)(value)

    def children(self, model: str) -> list[MetricWrapperBase]:
        ours = [self.ours.labels(model)] if self.ours else []
        return [*ours, self.vllm.labels(model, ENGINE)]


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.model = ""  # the served name, once the model is up
        self.engine: Engine | None = None
        self.kv_tokens: Callable[[], tuple[int, int] | None] = lambda: None
        registry = self.registry
        self.requests = Counter("batchwise_requests", "HTTP requests by endpoint and status code",
                                ["model", "endpoint", "status"], registry=registry)
        self.prompt_tokens = Twin(Counter, "batchwise_prompt_tokens", "vllm:prompt_tokens",
                                  "prompt tokens of finished requests", registry)
        self.generation_tokens = Twin(Counter, "batchwise_generation_tokens", "vllm:generation_tokens",
                                      "tokens generated", registry)
        self.cached_tokens = Twin(Counter, "batchwise_prefix_cache_hit_tokens", "vllm:prefix_cache_hits",
                                  "prompt tokens served by the prefix cache", registry)
        self.queried_tokens = Twin(Counter, None, "vllm:prefix_cache_queries",
                                   "prompt tokens looked up in the prefix cache", registry)
        self.finished = Counter("vllm:request_success", "finished requests by why they finished",
                                [*VLLM_LABELS, "finished_reason"], registry=registry)
        self.prompt_lengths = Twin(Histogram, None, "vllm:request_prompt_tokens", "prompt tokens of a request",
                                   registry, buckets=TOKEN_BUCKETS)
        self.generation_lengths = Twin(Histogram, None, "vllm:request_generation_tokens",
                                       "tokens a request generated", registry, buckets=TOKEN_BUCKETS)
        self.ttft = Twin(Histogram, "batchwise_time_to_first_token_seconds", "vllm:time_to_first_token_seconds",
                         "from queueing to the first token", registry, buckets=LATENCY_BUCKETS)
        self.inter_token = Twin(Histogram, "batchwise_inter_token_latency_seconds", "vllm:inter_token_latency_seconds",
                                "between consecutive tokens", registry, buckets=STEP_BUCKETS)
        self.latency = Twin(Histogram, "batchwise_request_latency_seconds", "vllm:e2e_request_latency_seconds",
                            "from queueing to the last token", registry, buckets=LATENCY_BUCKETS)
        self.step = Histogram("batchwise_engine_step_seconds", "one engine step (forward and sampling)", ["model"],
                              buckets=STEP_BUCKETS, registry=registry)
        self.audio = Counter("batchwise_audio_seconds", "audio transcribed or translated", ["model"],
                             registry=registry)
        registry.register(EngineGauges(lambda: self.model, lambda: self.engine, lambda: self.kv_tokens()))

    def serve(self, model: str, engine: Engine, kv_tokens: Callable[[], tuple[int, int] | None]) -> None:
        """Start reporting on the model's engine."""
        self.model, self.engine, self.kv_tokens = model, engine, kv_tokens
        engine.on_step = self.step.labels(model).observe

    def request(self, endpoint: str, status: int) -> None:
        self.requests.labels(self.model, endpoint, str(status)).inc()

    def choice_finished(self, prompt_tokens: int, cached_tokens: int, started: float, token_times: list[float],
                        tokens: int, finish_reason: str) -> None:
        """One finished generation: its prompt (0 when a sibling counted it), tokens and their times."""
        model = self.model
        self.prompt_tokens.add(model, prompt_tokens)
        self.queried_tokens.add(model, prompt_tokens)
        self.cached_tokens.add(model, cached_tokens)
        self.generation_tokens.add(model, tokens)
        self.finished.labels(model, ENGINE, finish_reason).inc()
        if prompt_tokens:
            self.prompt_lengths.add(model, prompt_tokens)
        self.generation_lengths.add(model, tokens)
        if token_times:
            self.ttft.add(model, token_times[0] - started)
            self.latency.add(model, token_times[-1] - started)
            for before, after in zip(token_times, token_times[1:]):
                self.inter_token.add(model, after - before)

    def transcribed(self, seconds: float) -> None:
        self.audio.labels(self.model).inc(seconds)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
