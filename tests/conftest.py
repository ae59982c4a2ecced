import os
import sys
from pathlib import Path

# same reproducible-MKL setting main.py uses; must be set before torch loads MKL
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import openai  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from batching import ATTENTION_NAME  # noqa: E402
from config import Config  # noqa: E402
from model_manager import cached_gguf_conversion, embedded_gguf_path  # noqa: E402
from server_process import running_server  # noqa: E402

TINY_SIZES = dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, positions=1024)


@pytest.fixture(scope="session")
def embedded_model_dir() -> Path:
    """The embedded SmolLM2, converted once into the same cache folder the server uses."""
    return cached_gguf_conversion(embedded_gguf_path(), Path(Config().model_cache_dir))


@pytest.fixture(scope="session")
def base_url(embedded_model_dir):
    """One real chat server with the embedded model, shared by the end-to-end modules."""
    with running_server("--continuous-batching-batch-size", "16") as url:
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


def tiny_config(architecture: str, vocab_size: int) -> transformers.PretrainedConfig:
    s = TINY_SIZES
    if architecture == "gpt2":
        return transformers.GPT2Config(vocab_size=vocab_size, n_embd=s["hidden"], n_layer=s["layers"],
                                       n_head=s["heads"], n_positions=s["positions"], eos_token_id=2, bos_token_id=1)
    config_class = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}[architecture]
    return config_class(vocab_size=vocab_size, hidden_size=s["hidden"], num_hidden_layers=s["layers"],
                        num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"],
                        intermediate_size=s["intermediate"], max_position_embeddings=s["positions"],
                        eos_token_id=2, bos_token_id=1, tie_word_embeddings=True)


def tiny_model(architecture: str, vocab_size: int, seed: int = 0) -> transformers.PreTrainedModel:
    """A random-weight model; weights are scaled up so greedy output varies token to token."""
    torch.manual_seed(seed)
    config = tiny_config(architecture, vocab_size)
    config._attn_implementation = ATTENTION_NAME
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=ATTENTION_NAME)
    return model.eval()


@pytest.fixture(params=["llama", "qwen2", "gpt2"])
def architecture(request) -> str:
    return request.param
