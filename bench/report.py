"""The one markdown table: server levels and baselines, with each row's ratio to both baselines."""

from __future__ import annotations

import math

from bench.stats import Measurement


def fmt(value: float, digits: int = 2) -> str:
    return "n/a" if math.isnan(value) else f"{value:.{digits}f}"


def ratio(measurement: Measurement, baseline: Measurement | None) -> str:
    if baseline is None or not baseline.tokens_per_s:
        return "n/a"
    return f"{measurement.tokens_per_s / baseline.tokens_per_s:.2f}x"


def requests_cell(measurement: Measurement) -> str:
    cell = str(measurement.requests)
    return f"{cell} ({measurement.failed} failed)" if measurement.failed else cell


def row(measurement: Measurement, sequential: Measurement | None, static_batch: Measurement | None) -> str:
    cells = [
        measurement.configuration,
        requests_cell(measurement),
        fmt(measurement.tokens_per_s, 1),
        f"{fmt(measurement.ttft(0.5))} / {fmt(measurement.ttft(0.95))}",
        f"{fmt(measurement.latency(0.5))} / {fmt(measurement.latency(0.95))}",
        ratio(measurement, sequential),
        ratio(measurement, static_batch),
    ]
    return "| " + " | ".join(cells) + " |"


def markdown_table(server: list[Measurement], sequential: Measurement | None,
                   static_batch: Measurement | None) -> str:
    static_name = f"generate@{static_batch.requests}" if static_batch else "generate"
    header = ["configuration", "requests", "completion tokens/s", "TTFT p50 / p95 (s)", "latency p50 / p95 (s)",
              "ratio vs sequential generate", f"ratio vs static-batch {static_name}"]
    baselines = [m for m in (sequential, static_batch) if m is not None]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += [row(m, sequential, static_batch) for m in [*server, *baselines]]
    return "\n".join(lines)


def short_completion_notes(measurements: list[Measurement]) -> list[str]:
    """Requests that stopped at EOS before the limit lower tokens/s honestly; say so rather than hide it."""
    notes = []
    for m in measurements:
        if m.requested_tokens_each and m.mean_completion_tokens < m.requested_tokens_each:
            notes.append(f"- {m.configuration}: {fmt(m.mean_completion_tokens, 1)} completion tokens per request "
                         f"on average (limit {m.requested_tokens_each}); tokens/s counts the real tokens.")
    return notes
