"""How long the server takes to start, until /health answers: eager; with the default, --torch-compile auto, on
its first start (an empty compile cache: it serves eagerly at once, and its background compile saves every
bucket's step: the time until that ends is shown too) and on later starts (the saved steps loaded); and with
--torch-compile true on its first start (every bucket compiled before serving). Each is then asked the same greedy
question, whose answer should not change. Later starts alternate with eager ones, so both meet the same machine.

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
from tests.helpers.server_process import START_TIMEOUT_SECONDS, compiling, running_server

QUESTION = "What is the capital of France?"


def timed_start(argv: list[str], env: dict[str, str]) -> tuple[float, float | None, str]:
    """Seconds from launch until /health answers, until a background compile has ended (None: there was none), and
    the server's greedy answer to QUESTION then."""
    started = time.perf_counter()
    with running_server(*argv, env=env, settled=False) as base_url:
        ready = time.perf_counter() - started
        waited = compiling(httpx.get(f"{base_url}/health"))
        while compiling(httpx.get(f"{base_url}/health")):
            if time.perf_counter() - started > START_TIMEOUT_SECONDS:
                raise RuntimeError(f"the background compile still ran after {START_TIMEOUT_SECONDS} s")
            time.sleep(0.5)
        compiled = time.perf_counter() - started if waited else None
        model = httpx.get(f"{base_url}/v1/models").json()["data"][0]["id"]
        reply = httpx.post(f"{base_url}/v1/chat/completions", timeout=120,
                           json=chat_body(model, QUESTION, 16, {"stream": False, "stream_options": None})).json()
    return ready, compiled, reply["choices"][0]["message"]["content"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Start-up time: eager, the default (auto) first and later, and "
                                                 "--torch-compile true first.")
    parser.add_argument("--server-args", default="", help="main.py flags for every start")
    parser.add_argument("--later", type=int, default=2, choices=range(1, 10), metavar="N",
                        help="later starts of each kind (1-9)")
    args = parser.parse_args(argv)
    flags = shlex.split(args.server_args)
    default, eager, compiled = ["--torch-compile", "auto"], ["--torch-compile", "false"], ["--torch-compile", "true"]
    rows = []
    with tempfile.TemporaryDirectory(prefix="batchwise-startup-") as cache:
        for name, extra, folder in [("default (auto), first start", default, "auto"),
                                    *[start for _ in range(args.later)
                                      for start in [("eager", eager, "auto"), ("default (auto), later start", default,
                                                                               "auto")]],
                                    ("--torch-compile true, first start", compiled, "true")]:
            print(f"starting: {name}", flush=True)
            # compiled graphs and saved steps: empty at each kind's first start
            env = {"TORCHINDUCTOR_CACHE_DIR": os.path.join(cache, folder)}
            rows.append((name, *timed_start(flags + extra, env)))
    eager_answer = next(answer for name, _, _, answer in rows if name == "eager")
    print(f"\n{cpu_model()}, {os.cpu_count()} CPUs; main.py {args.server_args or '(defaults)'}\n")
    print("| start | ready after (s) | background compile ended after (s) | greedy answer as eager's |")
    print("|---|---|---|---|")
    for name, seconds, compiled_after, answer in rows:
        print(f"| {name} | {seconds:.1f} | {'-' if compiled_after is None else f'{compiled_after:.1f}'} | "
              f"{'yes' if answer == eager_answer else 'no: ' + repr(answer)} |")


if __name__ == "__main__":
    main()
