"""End to end: the server started with a vLLM-style command line (a positional model, vLLM's flag spellings, bare
booleans), driven by the OpenAI SDK, and vLLM's /tokenize, /detokenize and /version over plain HTTP."""

import httpx
import openai
import pytest

from tests.helpers.server_process import running_server

pytestmark = pytest.mark.e2e

KEY = "vllm-key"
MAX_MODEL_LEN = 2048
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def vllm_url(embedded_model_dir, tmp_path_factory):
    with running_server(str(embedded_model_dir), "--dtype", "float32", "--max-num-seqs", "4",
                        "--enable-prefix-caching", "--served-model-name", "a", "b", "--max-model-len",
                        str(MAX_MODEL_LEN), "--max-logprobs", "3", "--seed", "7", "--enable-auto-tool-choice",
                        "--trust-remote-code", "--download-dir", str(tmp_path_factory.mktemp("downloads")),
                        "--uvicorn-log-level", "WARNING", "--loglevel", "info", "--api-key", KEY) as url:
        yield url


@pytest.fixture(scope="module")
def vllm_client(vllm_url):
    return openai.OpenAI(base_url=f"{vllm_url}/v1", api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def http(vllm_url):
    with httpx.Client(base_url=vllm_url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as client:
        yield client


def test_every_served_name_answers_and_models_show_max_model_len(vllm_client, http):
    assert [(m.id, m.max_model_len) for m in vllm_client.models.list().data] == [("a", MAX_MODEL_LEN),
                                                                                ("b", MAX_MODEL_LEN)]
    assert http.get("/v1/models/b").json()["max_model_len"] == MAX_MODEL_LEN
    response = vllm_client.chat.completions.create(model="b", messages=FRANCE, temperature=0, max_tokens=8)
    assert "Paris" in response.choices[0].message.content and response.model == "b"


def test_tokenize_a_prompt_as_completions_do_and_back(http, tokenizer):
    body = http.post("/tokenize", json={"model": "a", "prompt": "Hello world", "return_token_strs": True}).json()
    assert body["tokens"] == tokenizer("Hello world").input_ids and body["count"] == len(body["tokens"])
    assert body["max_model_len"] == MAX_MODEL_LEN
    assert body["token_strs"] == tokenizer.convert_ids_to_tokens(body["tokens"])
    assert http.post("/detokenize", json={"model": "a", "tokens": body["tokens"]}).json() == {"prompt": "Hello world"}
    assert "token_strs" not in http.post("/tokenize", json={"prompt": "Hello"}).json()


def template_ids(tokenizer, messages: list[dict], **ending) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, **ending)
    return tokenizer(text, add_special_tokens=False).input_ids


def test_tokenize_messages_counts_the_prompt_chat_completions_prefill(http, vllm_client, tokenizer):
    usage = vllm_client.chat.completions.create(model="a", messages=FRANCE, max_tokens=1).usage
    body = http.post("/tokenize", json={"model": "a", "messages": FRANCE}).json()
    assert body["count"] == usage.prompt_tokens == len(body["tokens"])
    assert body["tokens"] == template_ids(tokenizer, FRANCE, add_generation_prompt=True)
    bare = http.post("/tokenize", json={"messages": FRANCE, "add_generation_prompt": False}).json()
    assert bare["tokens"] == template_ids(tokenizer, FRANCE, add_generation_prompt=False)
    assert bare["count"] < body["count"]
    draft = [*FRANCE, {"role": "assistant", "content": "The capital is"}]
    continued = http.post("/tokenize", json={"messages": draft, "continue_final_message": True}).json()
    assert http.post("/detokenize", json={"tokens": continued["tokens"]}).json()["prompt"].endswith("The capital is")


def test_version_is_open_and_the_tokenizer_endpoints_need_the_key(vllm_url):
    version = httpx.get(f"{vllm_url}/version")
    assert version.status_code == 200 and set(version.json()) == {"version"}
    for path, body in (("/tokenize", {"prompt": "hi"}), ("/detokenize", {"tokens": [1]})):
        response = httpx.post(f"{vllm_url}{path}", json=body)
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"


@pytest.mark.parametrize("path, body, status, param", [
    ("/tokenize", {"model": "a"}, 400, None),
    ("/tokenize", {"prompt": "hi", "messages": FRANCE}, 400, None),
    ("/tokenize", {"messages": []}, 400, "messages"),
    ("/tokenize", {"messages": FRANCE, "add_generation_prompt": True, "continue_final_message": True}, 400, None),
    ("/tokenize", {"model": "gpt-17", "prompt": "hi"}, 404, "model"),
    ("/detokenize", {"tokens": [10 ** 9]}, 400, "tokens"),
    ("/detokenize", {"tokens": "one two"}, 400, "tokens"),
    ("/detokenize", {"model": "gpt-17", "tokens": [1]}, 404, "model"),
])
def test_bad_tokenizer_requests_get_openai_errors(http, path, body, status, param):
    response = http.post(path, json=body)
    error = response.json()["error"]
    assert response.status_code == status and set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and error["message"]


def test_max_logprobs_limits_what_requests_ask_for(vllm_client):
    chat = vllm_client.chat.completions.create(model="a", messages=FRANCE, max_tokens=2, logprobs=True,
                                               top_logprobs=3)
    assert all(len(entry.top_logprobs) == 3 for entry in chat.choices[0].logprobs.content)
    with pytest.raises(openai.BadRequestError) as error:
        vllm_client.chat.completions.create(model="a", messages=FRANCE, max_tokens=2, logprobs=True, top_logprobs=4)
    assert error.value.body["param"] == "top_logprobs" and "--max-logprobs" in error.value.body["message"]
    with pytest.raises(openai.BadRequestError) as error:
        vllm_client.completions.create(model="a", prompt="Hi", max_tokens=2, logprobs=4)
    assert error.value.body["param"] == "logprobs"


def test_the_default_seed_samples_unseeded_requests_alike(vllm_client):
    def sampled(**seed):
        return vllm_client.chat.completions.create(model="a", messages=[{"role": "user", "content": "Tell a story."}],
                                                   temperature=1.0, max_tokens=16, **seed).choices[0].message.content
    assert sampled() == sampled() == sampled(seed=7)
