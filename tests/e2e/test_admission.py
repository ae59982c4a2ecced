"""Access and admission on the real server: API keys, 429 at capacity, CORS, timeouts, graceful shutdown."""

import signal
import threading
import time

import httpx
import openai
import pytest

from config import Config
from tests.helpers.server_process import free_port, main_command, running_server, spawn, wait_healthy

pytestmark = pytest.mark.e2e

MODEL = "SmolLM2-135M-Instruct"
LONG = {"model": MODEL, "messages": [{"role": "user", "content": "Write a long essay about oceans."}],
        "max_tokens": 3000, "temperature": 0, "stream": True}
KEYS = "key-one,key-two"


@pytest.fixture(scope="module")
def guarded_url(embedded_model_dir):
    with running_server("--api-key", KEYS, "--max-concurrent", "2", "--continuous-batching-batch-size", "1",
                        "--allowed-origins", "http://app.example",
                        "--served-model-name", f"{MODEL},smol") as url:
        yield url


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_api_keys_guard_v1_but_not_health(guarded_url):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    for headers in ({}, bearer("wrong"), {"Authorization": "key-one"}):
        response = httpx.post(f"{guarded_url}/v1/chat/completions", json=body, headers=headers)
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{guarded_url}/v1/models").status_code == 401
    assert httpx.get(f"{guarded_url}/health").status_code == 200
    client = openai.OpenAI(base_url=f"{guarded_url}/v1", api_key="key-two", max_retries=0)
    assert client.chat.completions.create(**body).usage.completion_tokens == 2
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{guarded_url}/v1", api_key="nope", max_retries=0).models.list()


def test_served_model_name_aliases(guarded_url):
    client = openai.OpenAI(base_url=f"{guarded_url}/v1", api_key="key-one", max_retries=0)
    assert [m.id for m in client.models.list().data] == [MODEL, "smol"]
    response = client.completions.create(model="smol", prompt="Hello", max_tokens=2)
    assert response.model == "smol"


def test_api_keys_from_a_file(tmp_path):
    keys = tmp_path / "keys.txt"
    keys.write_text("# team keys\nalpha\n\n beta \n")
    assert Config(api_key=str(keys)).api_keys() == ["alpha", "beta"]
    assert Config(api_key="a, b").api_keys() == ["a", "b"]


def health(url: str) -> dict:
    return httpx.get(f"{url}/health").json()


def wait_for(condition, seconds: float = 15) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.02)


def test_capacity_gives_429_at_once_and_a_waiting_disconnect_leaves_the_queue(guarded_url):
    with httpx.Client(timeout=60, headers=bearer("key-one")) as http:
        def open_stream() -> httpx.Response:
            return http.send(http.build_request("POST", f"{guarded_url}/v1/chat/completions", json=LONG), stream=True)

        running = open_stream()
        wait_for(lambda: health(guarded_url)["running"] == 1)
        waiting = open_stream()
        wait_for(lambda: health(guarded_url)["waiting"] == 1)
        started = time.monotonic()
        refused = http.post(f"{guarded_url}/v1/chat/completions", json={**LONG, "stream": False})
        assert refused.status_code == 429 and time.monotonic() - started < 2
        assert refused.headers["retry-after"] and refused.json()["error"]["type"] == "rate_limit_exceeded"
        waiting.close()
        wait_for(lambda: health(guarded_url)["waiting"] == 0)
        assert health(guarded_url)["running"] == 1
        running.close()
        wait_for(lambda: health(guarded_url)["running"] == 0)


def test_cors_only_for_allowed_origins(guarded_url, base_url):
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}
    allowed = httpx.options(f"{guarded_url}/v1/chat/completions", headers={"Origin": "http://app.example", **preflight})
    assert allowed.headers["access-control-allow-origin"] == "http://app.example"
    other = httpx.options(f"{guarded_url}/v1/chat/completions", headers={"Origin": "http://evil.example", **preflight})
    assert "access-control-allow-origin" not in other.headers
    default = httpx.get(f"{base_url}/health", headers={"Origin": "http://app.example"})
    assert "access-control-allow-origin" not in default.headers


def test_request_timeout_cancels_and_answers_408(embedded_model_dir):
    with running_server("--request-timeout", "3") as url:
        started = time.monotonic()
        response = httpx.post(f"{url}/v1/chat/completions", json={**LONG, "stream": False}, timeout=60)
        assert response.status_code == 408 and response.json()["error"]["code"] == "request_timeout"
        assert 2.5 < time.monotonic() - started < 15
        wait_for(lambda: health(url)["running"] == 0)
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=LONG, timeout=60) as stream:
            events = [line for line in stream.iter_lines() if line.startswith("data:")]
        assert "request_timeout" in events[-2] and events[-1] == "data: [DONE]"


def test_sigterm_drains_running_requests_then_exits(embedded_model_dir, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "server.log"
    server = spawn(main_command(port, "--shutdown-grace", "60"), log)
    try:
        wait_healthy(url, server, log)
        body = {**LONG, "max_tokens": 40, "stream": False}
        result = {}
        worker = threading.Thread(target=lambda: result.update(
            response=httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)))
        worker.start()
        wait_for(lambda: health(url)["running"] == 1)
        server.send_signal(signal.SIGTERM)
        wait_for(lambda: httpx.get(f"{url}/health").status_code == 503)
        assert httpx.get(f"{url}/health").json()["status"] == "draining"
        refused = httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2})
        assert refused.status_code == 503
        worker.join(timeout=120)
        finished = result["response"].json()
        assert finished["usage"]["completion_tokens"] == 40 and finished["choices"][0]["finish_reason"] == "length"
        # uvicorn re-raises the captured SIGTERM once it has shut down, so the exit reports that signal
        assert server.wait(timeout=60) in (0, -signal.SIGTERM)
    finally:
        if server.poll() is None:
            server.kill()
