"""How long the server takes to start, until /health answers: eager, and with --torch-compile on its first start
(an empty compile cache: every bucket traced, compiled and saved) and on later starts (the saved steps loaded),
each then asked the same greedy question, whose answer should not change. Later starts alternate with eager ones,
so that both meet the same machine.

    python -m bench.startup                                   # the embedded model, two later starts of each
    python -m bench.startup --later 3 --server-args "--int8 true"
"""

from __future__ import annotations

import argparse
import os
import shlex
import tempfile
import time

import httpx

from bench.load import chat_body
from bench.report import cpu_model
from tests.helpers.server_process import running_server

QUESTION = "What is the capital of France?"


def timed_start(argv: list[str], env: dict[str, str]) -> tuple[float, str]:
    """Seconds from launch until /health answers, and the server's greedy answer to QUESTION."""
    started = time.perf_counter()
    with running_server(*argv, env=env) as base_url:
        ready = time.perf_counter() - started
        model = httpx.get(f"{base_url}/v1/models").json()["data"][0]["id"]
        reply = httpx.post(f"{base_url}/v1/chat/completions", timeout=120,
                           json=chat_body(model, QUESTION, 16, {"stream": False, "stream_options": None})).json()
    return ready, reply["choices"][0]["message"]["content"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Start-up time: eager, and --torch-compile first and later.")
    parser.add_argument("--server-args", default="", help="main.py flags for every start")
    parser.add_argument("--later", type=int, default=2, choices=range(1, 10), metavar="N",
                        help="later starts of each kind (1-9)")
    args = parser.parse_args(argv)
    flags = shlex.split(args.server_args)
    rows = []
    with tempfile.TemporaryDirectory(prefix="batchwise-startup-") as cache:
        env = {"TORCHINDUCTOR_CACHE_DIR": cache}  # compiled graphs and saved steps: empty at the first start
        compiled, eager = ["--torch-compile", "true"], ["--torch-compile", "false"]
        starts = [("--torch-compile, first start", compiled)]
        for _ in range(args.later):
            starts += [("eager", eager), ("--torch-compile, later start", compiled)]
        for name, extra in starts:
            print(f"starting: {name}", flush=True)
            rows.append((name, *timed_start(flags + extra, env)))
    eager_answer = next(answer for name, _, answer in rows if name == "eager")
    print(f"\n{cpu_model()}, {os.cpu_count()} CPUs; main.py {args.server_args or '(defaults)'}\n")
    print("| start | ready after (s) | greedy answer as eager's |")
    print("|---|---|---|")
    for name, seconds, answer in rows:
        print(f"| {name} | {seconds:.1f} | {'yes' if answer == eager_answer else 'no: ' + repr(answer)} |")


if __name__ == "__main__":
    main()
