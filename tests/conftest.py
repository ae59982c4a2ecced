"""Fixtures shared by every test: the embedded model converted once, one real server for the end-to-end
modules, its OpenAI clients, and the architectures the engine tests run on."""

import os
from pathlib import Path

# the engine tests compare batched output with alone output: MKL's reproducible mode, as main.py sets it with
# --batch-invariant; before torch makes its first MKL call
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
# parity with transformers' generate is checked in float32; servers the tests start would otherwise take --torch-dtype
# auto's bfloat16 on CPUs with AVX512-BF16 or AMX (auto's choice is tested on its own, in test_speed_path)
os.environ.setdefault("TORCH_DTYPE", "float32")
# and --torch-compile auto would start a background compile beside each server (its own test is in
# tests/e2e/test_speed_path.py); a server the tests start runs the path its flags choose
os.environ.setdefault("TORCH_COMPILE", "false")

import openai  # noqa: E402
import pytest  # noqa: E402
import transformers  # noqa: E402

from config import Config  # noqa: E402
from converters.gguf import cached_gguf_conversion  # noqa: E402
from model_manager import embedded_gguf_path  # noqa: E402
from tests.helpers.server_process import running_server  # noqa: E402
from tests.helpers.tiny_models import tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def embedded_model_dir() -> Path:
    """The embedded SmolLM2, converted once into the same cache folder the server uses."""
    return cached_gguf_conversion(embedded_gguf_path(), Path(Config().model_cache_dir))


@pytest.fixture(scope="session")
def base_url(embedded_model_dir):
    """One real chat server with the embedded model, shared by the end-to-end modules; batch-invariant, so that
    tests can compare a request's output in a batch with its output alone."""
    with running_server("--continuous-batching-batch-size", "16", "--batch-invariant", "true") as url:
        yield url


@pytest.fixture(scope="session")
def client(base_url):
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="-", max_retries=0)


@pytest.fixture
def async_client(base_url):
    return openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="-", max_retries=0)


@pytest.fixture(scope="session")
def tokenizer(embedded_model_dir):
    return transformers.AutoTokenizer.from_pretrained(embedded_model_dir)


THINKING_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% else %}<think>\n{% endif %}"
    "{% endif %}"
)


@pytest.fixture(scope="session")
def thinking_model(embedded_model_dir, tmp_path_factory):
    """A tiny random model whose chat template opens a think block (unless enable_thinking is false, as Qwen3's),
    saved to a folder; and its </think> id."""
    folder = tmp_path_factory.mktemp("thinking-model")
    tokenizer = transformers.AutoTokenizer.from_pretrained(embedded_model_dir)
    tokenizer.add_tokens(["</think>"])
    tokenizer.chat_template = THINKING_TEMPLATE
    tiny_model("llama", len(tokenizer), seed=1).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, tokenizer.convert_tokens_to_ids("</think>")


@pytest.fixture(params=["llama", "qwen2", "gpt2"])
def architecture(request) -> str:
    return request.param
