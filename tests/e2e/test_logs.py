"""--log-format json: every line the server writes is one JSON object, and a finished request's line
carries its id and token counts."""

import json

import httpx

from tests.helpers.server_process import running_server


def test_json_logs_carry_the_request_fields(embedded_model_dir, tmp_path):
    log_path = tmp_path / "server.log"
    with running_server("--log-format", "json", log_path=log_path) as url:
        # ignore_eos: a sampled reply may end on its own within 5 tokens, and the test asserts where it ends
        body = {"model": "SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5,
                "ignore_eos": True}
        reply = httpx.post(f"{url}/v1/chat/completions", json=body, headers={"x-request-id": "trace-42"},
                           timeout=120).json()
    lines = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    assert all({"time", "level", "logger", "message"} <= line.keys() for line in lines)
    [finished] = [line for line in lines if line.get("request_id") == "chatcmpl-trace-42"]
    assert finished["prompt_tokens"] == reply["usage"]["prompt_tokens"]
    assert finished["completion_tokens"] == reply["usage"]["completion_tokens"] == 5
    assert finished["finish_reason"] == "length" and finished["ttft_s"] > 0
    assert any(line["logger"].startswith("uvicorn") for line in lines)
