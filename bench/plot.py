"""Completion tokens/s against concurrency, one line per server configuration, the generate() baselines as
horizontal lines."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from bench.stats import Measurement  # noqa: E402


def plot_throughput(servers: list[Measurement], baselines: list[Measurement], path: Path, machine: str) -> None:
    lines: defaultdict[str, list[Measurement]] = defaultdict(list)
    for measurement in servers:
        lines[measurement.configuration.rsplit(", concurrency", 1)[0]].append(measurement)
    figure, axes = plt.subplots(figsize=(8, 5))
    for name, points in lines.items():
        points.sort(key=lambda m: m.concurrency)
        axes.plot([m.concurrency for m in points], [m.tokens_per_s for m in points], marker="o", label=name)
    for baseline, style in zip(baselines, (":", "--")):
        axes.axhline(baseline.tokens_per_s, linestyle=style, color="grey", label=baseline.configuration)
    axes.set_xscale("log", base=2)
    axes.set_xticks(sorted({m.concurrency for m in servers}))
    axes.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    axes.set_xlabel("concurrent streaming requests")
    axes.set_ylabel("completion tokens/s")
    axes.set_title(f"128-token chat completions, {machine}", fontsize=10)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8, loc="upper left")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
