"""The one markdown table: server levels and baselines, with each row's ratio to both baselines."""

from __future__ import annotations

import math
import platform
from pathlib import Path

from bench.stats import Measurement

TRANSFORMERS_SERVE = "transformers serve"


def fmt(value: float, digits: int = 2) -> str:
    return "n/a" if math.isnan(value) else f"{value:.{digits}f}"


def ratio(measurement: Measurement, baseline: Measurement | None) -> str:
    if baseline is None or not baseline.tokens_per_s:
        return "n/a"
    return f"{measurement.tokens_per_s / baseline.tokens_per_s:.2f}x"


def requests_cell(measurement: Measurement) -> str:
    cell = str(measurement.requests)
    return f"{cell} ({measurement.failed} failed)" if measurement.failed else cell


def row(measurement: Measurement, sequential: Measurement | None, static_batch: Measurement | None,
        peer: Measurement | None) -> str:
    cells = [
        measurement.configuration,
        requests_cell(measurement),
        fmt(measurement.tokens_per_s, 1),
        f"{fmt(measurement.ttft(0.5))} / {fmt(measurement.ttft(0.95))}",
        f"{fmt(measurement.latency(0.5))} / {fmt(measurement.latency(0.95))}",
        ratio(measurement, sequential),
        ratio(measurement, static_batch),
        ratio(measurement, peer),
    ]
    return "| " + " | ".join(cells) + " |"


def markdown_table(servers: list[Measurement], sequential: Measurement | None,
                   static_batch: Measurement | None, baselines: list[Measurement]) -> str:
    """Every server level and baseline run, with its ratio to `sequential` and `static_batch` and to `transformers
    serve` at the same concurrency (when that was measured)."""
    static_name = f"generate@{static_batch.requests}" if static_batch else "generate"
    header = ["configuration", "requests", "completion tokens/s", "TTFT p50 / p95 (s)", "latency p50 / p95 (s)",
              "vs sequential generate", f"vs static-batch {static_name}", "vs transformers serve"]
    peers = {m.concurrency: m for m in servers if m.configuration.startswith(TRANSFORMERS_SERVE)}
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += [row(m, sequential, static_batch, peers.get(m.concurrency)) for m in [*servers, *baselines]]
    return "\n".join(lines)


def short_completion_notes(measurements: list[Measurement]) -> list[str]:
    """Requests that stopped at EOS before the limit lower tokens/s honestly; say so rather than hide it."""
    notes = []
    for m in measurements:
        if m.requested_tokens_each and m.mean_completion_tokens < m.requested_tokens_each:
            notes.append(f"- {m.configuration}: {fmt(m.mean_completion_tokens, 1)} completion tokens per request "
                         f"on average (limit {m.requested_tokens_each}); tokens/s counts the real tokens.")
    return notes


def cpu_model() -> str:
    """/proc/cpuinfo's model name, else the platform's (here, where importing it needs no plotting library)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
