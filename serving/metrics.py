"""Prometheus metrics through prometheus-client: what requests and the engine did, named batchwise_* and
labelled with the served model. Request timings are observed when a choice finishes; engine gauges are
read when /metrics is scraped."""

from __future__ import annotations

from typing import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from batching import Engine

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


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
        stats = engine.stats()
        for name, help_text, value in [("running", "sequences in the running batch", stats.running),
                                       ("waiting", "sequences queued for admission", stats.waiting)]:
            yield labelled(f"batchwise_sequences_{name}", help_text, self.model(), value)
        kv = self.kv_tokens()
        if kv is not None:
            used, budget = kv
            yield labelled("batchwise_kv_tokens_used", "KV positions held by sequences and the prefix cache",
                        self.model(), used)
            yield labelled("batchwise_kv_tokens_budget", "KV positions the budget holds", self.model(), budget)
        if stats.drafts is not None:
            for name, help_text, value in [
                    ("draft_tokens", "draft tokens proposed for verification", stats.drafts.proposed),
                    ("accepted_tokens", "draft tokens the model accepted", stats.drafts.accepted),
                    ("verification_steps", "rows that verified a draft, one per row and step",
                     stats.drafts.verifications)]:
                yield labelled(f"batchwise_spec_decode_{name}", help_text, self.model(), value, CounterMetricFamily)


def labelled(name: str, help_text: str, model: str, value: float,
          kind: type[GaugeMetricFamily | CounterMetricFamily] = GaugeMetricFamily) -> GaugeMetricFamily:
    family = kind(name, help_text, labels=["model"])
    family.add_metric([model], value)
    return family


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.model = ""  # the served name, once the model is up
        self.engine: Engine | None = None
        self.kv_tokens: Callable[[], tuple[int, int] | None] = lambda: None
        registry = self.registry
        self.requests = Counter("batchwise_requests", "HTTP requests by endpoint and status code",
                                ["model", "endpoint", "status"], registry=registry)
        self.prompt_tokens = Counter("batchwise_prompt_tokens", "prompt tokens of finished requests", ["model"],
                                     registry=registry)
        self.generation_tokens = Counter("batchwise_generation_tokens", "tokens generated", ["model"],
                                         registry=registry)
        self.cached_tokens = Counter("batchwise_prefix_cache_hit_tokens", "prompt tokens served by the prefix cache",
                                     ["model"], registry=registry)
        self.ttft = Histogram("batchwise_time_to_first_token_seconds", "from queueing to the first token",
                              ["model"], buckets=LATENCY_BUCKETS, registry=registry)
        self.inter_token = Histogram("batchwise_inter_token_latency_seconds", "between consecutive tokens",
                                     ["model"], buckets=STEP_BUCKETS, registry=registry)
        self.latency = Histogram("batchwise_request_latency_seconds", "from queueing to the last token", ["model"],
                                 buckets=LATENCY_BUCKETS, registry=registry)
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
                        tokens: int) -> None:
        """One finished generation: its prompt (0 when a sibling counted it), tokens and their times."""
        model = self.model
        self.prompt_tokens.labels(model).inc(prompt_tokens)
        self.cached_tokens.labels(model).inc(cached_tokens)
        self.generation_tokens.labels(model).inc(tokens)
        if token_times:
            self.ttft.labels(model).observe(token_times[0] - started)
            self.latency.labels(model).observe(token_times[-1] - started)
            inter_token = self.inter_token.labels(model)
            for before, after in zip(token_times, token_times[1:]):
                inter_token.observe(after - before)

    def transcribed(self, seconds: float) -> None:
        self.audio.labels(self.model).inc(seconds)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
