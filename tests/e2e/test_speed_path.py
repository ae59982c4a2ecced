"""The speed path through the real server and the openai SDK: the embedded model with a static cache, a tiny
model with its decode step compiled (the embedded model would take minutes to compile on a CI machine), and
the embedded model quantised with HQQ (in bfloat16, so on CPU its layers run torch's int4 kernel) and with
--int8."""

import re
import signal
import time
from pathlib import Path

import httpx
import openai
import pytest
import transformers

from tests.helpers.server_process import (START_TIMEOUT_SECONDS, free_port, main_command, running_server, spawn,
                                          wait_healthy)
from tests.helpers.tiny_models import tiny_model

pytestmark = pytest.mark.e2e

PARIS = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def tiny_folder(embedded_model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-model")
    tokenizer = transformers.AutoTokenizer.from_pretrained(embedded_model_dir)
    tiny_model("llama", len(tokenizer), seed=2).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


SERVERS = {
    "static cache": ("SmolLM2-135M-Instruct", ["--static-cache", "true", "--static-cache-decoder-max-length", "128",
                                               "--continuous-batching-batch-size", "4"]),
    "hqq int4": ("SmolLM2-135M-Instruct", ["--hqq", "true", "--torch-dtype", "bfloat16",
                                           "--continuous-batching-batch-size", "4"]),
    "int8": ("SmolLM2-135M-Instruct", ["--int8", "true", "--torch-dtype", "bfloat16",
                                       "--continuous-batching-batch-size", "4"]),
    "compiled, tiny model": ("tiny", ["--torch-compile", "true", "--static-cache-decoder-max-length", "96",
                                      "--continuous-batching-batch-size", "2", "--served-model-name", "tiny"]),
}


@pytest.fixture(scope="module", params=list(SERVERS))
def served(request, tiny_folder):
    model, flags = SERVERS[request.param]
    if model == "tiny":
        flags = ["--hf-model", str(tiny_folder), *flags]
    with running_server(*flags) as url:
        yield request.param, model, openai.OpenAI(base_url=f"{url}/v1", api_key="-", max_retries=0)


def test_chat_stream_and_completions_work_in_every_mode(served):
    mode, model, client = served
    reply = client.chat.completions.create(model=model, messages=PARIS, temperature=0, max_tokens=12)
    assert reply.choices[0].finish_reason in ("stop", "length") and reply.usage.completion_tokens <= 12
    if model != "tiny":
        assert "Paris" in reply.choices[0].message.content, (mode, reply.choices[0].message.content)
    chunks = list(client.chat.completions.create(model=model, messages=PARIS, temperature=0, max_tokens=12,
                                                 stream=True, stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == reply.choices[0].message.content and chunks[-1].usage.completion_tokens == \
        reply.usage.completion_tokens
    many = client.completions.create(model=model, prompt=["Once upon a time", "The sky is"], max_tokens=5,
                                     temperature=0, n=2)
    assert len(many.choices) == 4 and all(c.finish_reason in ("stop", "length") for c in many.choices)
    assert many.choices[0].text == many.choices[1].text, "greedy siblings agree"


def test_a_request_longer_than_a_static_slot_is_served_and_the_context_bounds_it(served):
    """Issue 36: the slot length is a tuning knob; a longer request runs as a long row beside the slots."""
    mode, model, client = served
    if mode != "static cache":
        pytest.skip("only the static cache has a fixed length per row")
    reply = client.chat.completions.create(model=model, messages=PARIS, temperature=0, max_tokens=200,
                                           extra_body={"ignore_eos": True})
    assert reply.usage.completion_tokens == 200 and reply.usage.total_tokens > 128
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model=model, messages=PARIS, max_tokens=10**6)
    assert "maximum context length" in error.value.body["message"]


def test_health_reports_loading_progress_until_the_compiled_step_is_warm(tiny_folder, tmp_path):
    port = free_port()
    log = tmp_path / "server.log"
    process = spawn(main_command(port, "--hf-model", str(tiny_folder), *SERVERS["compiled, tiny model"][1]), log)
    url, seen = f"http://127.0.0.1:{port}/health", []
    try:
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while time.monotonic() < deadline and process.poll() is None:
            try:
                response = httpx.get(url, timeout=2)
            except httpx.TransportError:
                continue
            body = response.json()
            if response.status_code == 200:
                break
            assert response.status_code == 503 and body["status"] == "loading" and body["elapsed_s"] >= 0
            if (body["stage"], body.get("done"), body.get("total")) not in seen:
                seen.append((body["stage"], body.get("done"), body.get("total")))
            time.sleep(0.05)
        assert body["status"] == "ok", log.read_text()[-3000:]
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=30)
    warming = [(done, total) for stage, done, total in seen if stage == "warming up the decode step"]
    # batch sizes 1 and 2, and 2 rows beside a step's 32 prompt tokens (on CPU prompt chunks join the step)
    assert warming and all(total == 3 for _, total in warming), seen
    assert [done for done, _ in warming] == sorted(done for done, _ in warming), seen
    assert "start-up: warming up the decode step" in log.read_text()


def test_the_default_serves_at_once_and_takes_up_the_steps_a_background_process_compiles(tiny_folder, tmp_path):
    """--torch-compile auto, the default on CPU: a first start serves eagerly at once while a process beside it
    compiles and saves each bucket's step (a process that ends with the server, even a killed one); a start takes
    the steps up as they are saved, answering as before; a later start loads them all and starts no process."""
    env = {"TORCH_COMPILE": "", "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "graphs")}  # "": unset, so the default
    flags = ["--hf-model", str(tiny_folder), "--static-cache-decoder-max-length", "96",
             "--continuous-batching-batch-size", "2", "--served-model-name", "tiny"]
    logs = [tmp_path / f"start-{number}.log" for number in range(3)]

    port = free_port()
    killed = spawn(main_command(port, *flags), logs[0], env)
    try:
        wait_healthy(f"http://127.0.0.1:{port}", killed, logs[0], settled=False)
        compiler = int(re.search(r"in a background process \(pid (\d+)", logs[0].read_text()).group(1))
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while not list(tmp_path.glob("graphs/steps/*/background-compile.log")) and time.monotonic() < deadline:
            time.sleep(0.2)  # its log opens once it follows the server (after its imports, at the lowest priority)
        assert running(compiler)
    finally:
        killed.kill()
        killed.wait()
    deadline = time.monotonic() + 30
    while running(compiler) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not running(compiler), "the background compile outlived its server"

    with running_server(*flags, env=env, log_path=logs[1], settled=False) as url:
        assert httpx.get(f"{url}/health").json()["compiling_decode_step"]["total"] == 3
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="-", max_retries=0)
        eager = greedy_answer(client)
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while "compiling_decode_step" in httpx.get(f"{url}/health").json() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert greedy_answer(client) == eager
    taking_up = logs[1].read_text()
    assert "the background compile has ended: 3 of 3 steps saved" in taking_up, taking_up[-3000:]
    assert re.search(r"loaded \S+/rows-1\.pt2", taking_up)
    [background_log] = (tmp_path / "graphs").glob("steps/*/background-compile.log")  # its output, not the server's
    assert "3 of 3 steps compiled" in background_log.read_text() and "steps compiled" not in taking_up

    with running_server(*flags, env=env, log_path=logs[2]) as url:
        assert greedy_answer(openai.OpenAI(base_url=f"{url}/v1", api_key="-", max_retries=0)) == eager
    later = logs[2].read_text()
    assert len(re.findall(r"loaded \S+/rows-\d+\.pt2", later)) == 3 and "background process" not in later


def greedy_answer(client: openai.OpenAI) -> str:
    reply = client.chat.completions.create(model="tiny", messages=PARIS, max_tokens=8, temperature=0)
    return reply.choices[0].message.content


def running(pid: int) -> bool:
    """Whether the process runs (a zombie that its new parent has not reaped does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
