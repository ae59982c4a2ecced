"""--torch-profiling: the first `steps` engine steps run under torch.profiler, each written as a Chrome trace
(open it in https://ui.perfetto.dev or chrome://tracing), and a table of the operators that took the most
time over all of them is logged at shutdown (and written beside the traces)."""

from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path
from typing import Callable, TypeVar

import torch
from torch.profiler import ProfilerActivity, profile

from batching.scheduler import Span

logger = logging.getLogger("batchwise.profiler")

T = TypeVar("T")
TOP_OPERATORS = 25


def step_kind(spans: list[Span]) -> str:
    decoding = sum(span.seq.decoding for span in spans)
    return "decode" if decoding == len(spans) else "prefill" if not decoding else "mixed"


class StepProfiler:
    def __init__(self, folder: Path, steps: int) -> None:
        self.folder = folder
        self.steps = steps
        self.profiled = 0
        self.operators: defaultdict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0])  # cpu us, device us, calls
        self.activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        folder.mkdir(parents=True, exist_ok=True)
        logger.info("profiling the first %d engine steps into %s", steps, folder)

    def run(self, spans: list[Span], step: Callable[[list[Span]], T]) -> T:
        """Run one engine step, under the profiler while the budget of profiled steps lasts."""
        if self.profiled >= self.steps:
            return step(spans)
        self.profiled += 1
        with profile(activities=self.activities, record_shapes=True) as profiler:
            result = step(spans)
        tokens = sum(span.stop - span.start for span in spans)
        profiler.export_chrome_trace(str(self.folder / f"step-{self.profiled:03d}-{step_kind(spans)}-"
                                                         f"{len(spans)}seq-{tokens}tok.json"))
        for event in profiler.key_averages():
            totals = self.operators[event.key]
            totals[0] += event.self_cpu_time_total
            totals[1] += getattr(event, "self_device_time_total", 0.0)
            totals[2] += event.count
        return result

    def report(self) -> str:
        """The top operators by self time over every profiled step; logged and written to summary.txt."""
        if not self.operators:
            return ""
        total = sum(cpu for cpu, _, _ in self.operators.values()) or 1.0
        rows = sorted(self.operators.items(), key=lambda item: -(item[1][0] + item[1][1]))[:TOP_OPERATORS]
        lines = [f"top operators over {self.profiled} profiled steps (self time):",
                 f"{'operator':<60} {'cpu ms':>10} {'cpu %':>7} {'device ms':>10} {'calls':>8}"]
        lines += [f"{name[:60]:<60} {cpu / 1000:>10.1f} {100 * cpu / total:>6.1f}% {device / 1000:>10.1f} {calls:>8}"
                  for name, (cpu, device, calls) in rows]
        text = "\n".join(lines)
        (self.folder / "summary.txt").write_text(text + "\n")
        logger.info("%s", text)
        return text
