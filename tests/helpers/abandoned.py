"""A client that leaves in the middle of its request, and the server's engine going quiet after it."""

from __future__ import annotations

import socket
import time
from typing import Any

import httpx


def health(base_url: str) -> dict[str, Any]:
    return httpx.get(f"{base_url}/health").json()


def leave_once_running(base_url: str, path: str, **request: Any) -> int:
    """POST a non-streamed request on a raw connection and close it once the engine runs it; the engine's step
    count then. A client-side read timeout cannot stand in: on a slow machine it can fire before the server has
    begun the work."""
    message = httpx.Request("POST", f"{base_url}{path}", **request)
    head = "".join(f"{name}: {value}\r\n" for name, value in message.headers.items())
    with socket.create_connection((message.url.host, message.url.port)) as connection:
        connection.sendall(f"POST {path} HTTP/1.1\r\n{head}\r\n".encode() + message.read())
        deadline = time.monotonic() + 60
        while (state := health(base_url))["running"] == 0:
            assert time.monotonic() < deadline, "the server never began the request"
            time.sleep(0.02)
        return state["steps"]


def wait_until_quiet(base_url: str, left_at_step: int, most_steps: int = 10, within: float = 60,
                     quiet: float = 1.0) -> None:
    """Wait until no request runs or waits and the engine takes at most one more step (one in flight) for `quiet`
    seconds; then the engine must have taken at most `most_steps` steps since the client left at `left_at_step`
    (those begun before the server noticed): counted in steps, not seconds, so a slow machine passes as a fast
    one, and a server that went on decoding fails however fast it finished."""
    deadline = time.monotonic() + within
    while True:
        before = health(base_url)
        time.sleep(quiet)
        after = health(base_url)
        idle = (before["running"], before["waiting"], after["running"], after["waiting"]) == (0, 0, 0, 0)
        if idle and after["steps"] - before["steps"] <= 1:
            assert after["steps"] - left_at_step <= most_steps, (left_at_step, after)
            return
        assert time.monotonic() < deadline, f"the abandoned request kept running: {before} then {after}"
