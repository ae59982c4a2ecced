"""The speed path through the real server and the openai SDK: the embedded model with a static cache, a tiny
model with its decode step compiled (the embedded model would take minutes to compile on a CI machine), and
the embedded model quantised with HQQ."""

import openai
import pytest
import transformers

from tests.helpers.server_process import running_server
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
    "hqq int4": ("SmolLM2-135M-Instruct", ["--hqq", "true", "--continuous-batching-batch-size", "4"]),
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


def test_the_static_length_bounds_a_request(served):
    mode, model, client = served
    if mode != "static cache":
        pytest.skip("only the static cache has a fixed length per row")
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model=model, messages=PARIS, max_tokens=200)
    assert "at most 128 tokens" in error.value.body["message"]
