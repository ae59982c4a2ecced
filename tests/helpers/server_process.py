"""Start the real server (main.py) as a subprocess on a free loopback port: for tests and benchmarks."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import httpx

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_SECONDS = 900


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main_command(port: int, *args: str) -> list[str]:
    return [sys.executable, "main.py", "--host", "127.0.0.1", "--port", str(port), *args]


def spawn(command: list[str], log_path: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start a server process from the project root, its output going to `log_path`."""
    with open(log_path, "w") as log:
        return subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, **(env or {})})


@contextmanager
def serving(command: list[str], port: int, log_path: Path, env: dict[str, str] | None = None,
            settled: bool = True) -> Iterator[str]:
    """Yield the base URL of the healthy server that `command` starts on `port`; stop it afterwards. settled: once
    the background compile of --torch-compile auto has ended too, so that measurements see what later starts run."""
    process = spawn(command, log_path, env)
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base_url, process, log_path, settled)
        yield base_url
    finally:
        process.send_signal(signal.SIGINT)  # uvicorn's graceful shutdown stops the engine cleanly
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


@contextmanager
def running_server(*args: str, env: dict[str, str] | None = None, log_path: Path | None = None,
                   settled: bool = True) -> Iterator[str]:
    """Yield the base URL of a healthy main.py server (settled: as serving's); its log tail is raised if it fails to
    start."""
    port = free_port()
    log_path = log_path or Path(os.environ.get("TMPDIR", "/tmp")) / f"batchwise-server-{port}.log"
    with serving(main_command(port, *args), port, log_path, env, settled) as base_url:
        yield base_url


def wait_healthy(base_url: str, process: subprocess.Popen, log_path: Path, settled: bool = True) -> None:
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{log_path.read_text()[-4000:]}")
        try:
            response = httpx.get(f"{base_url}/health", timeout=2)
            if response.status_code == 200 and not (settled and compiling(response)):
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"server not healthy after {START_TIMEOUT_SECONDS}s:\n{log_path.read_text()[-4000:]}")


def compiling(health: httpx.Response) -> bool:
    """Whether a Batchwise server's background compile (--torch-compile auto) still runs; the /health of other
    servers (the benchmarks' baselines) says nothing of it, or is not JSON."""
    try:
        return "compiling_decode_step" in health.json()
    except ValueError:
        return False
