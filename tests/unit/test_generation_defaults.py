"""--generation-config and --override-generation-config: which sampling defaults a model's generation config gives
the fields a request leaves unset, and how a request's own fields win (vLLM's rules)."""

import pytest
from transformers import GenerationConfig

from config import Config, ConfigError
from model_manager import sampling_defaults
from models import ChatCompletionRequest
from serving.text_service import checked_defaults
from tests.helpers.tiny_models import tiny_model

AUTHORS = {"temperature": 0.6, "top_p": 0.95, "top_k": 20, "max_new_tokens": 300, "repetition_penalty": 1.1,
           "do_sample": True, "num_beams": 1}


@pytest.fixture(scope="module")
def model():
    model = tiny_model("llama", 64)
    model.generation_config = GenerationConfig(**AUTHORS)
    return model


def test_auto_takes_the_sampling_fields_the_model_sets(model):
    assert sampling_defaults(Config(), model) == {"temperature": 0.6, "top_p": 0.95, "top_k": 20, "max_tokens": 300,
                                                  "repetition_penalty": 1.1}


@pytest.mark.parametrize("source", ["none", "vllm"])
def test_none_keeps_openais_defaults(model, source):
    assert sampling_defaults(Config(generation_config=source), model) == {}


def test_a_folder_gives_its_generation_config_and_overrides_go_on_top(model, tmp_path):
    (tmp_path / "generation_config.json").write_text('{"temperature": 0.3, "top_k": 0, "do_sample": true}')
    config = Config(generation_config=str(tmp_path), override_generation_config='{"min_p": 0.05, "temperature": 0.1}')
    assert sampling_defaults(config, model) == {"temperature": 0.1, "top_k": -1, "min_p": 0.05}


def test_a_model_with_no_sampling_choices_changes_nothing():
    assert sampling_defaults(Config(), tiny_model("llama", 64)) == {}


def test_defaults_no_request_could_give_fail_at_start_up():
    with pytest.raises(ValueError, match="not valid request values"):
        checked_defaults({"top_p": 0.0})
    with pytest.raises(ConfigError, match="unsupported keys"):
        Config(override_generation_config='{"num_beams": 4}').validate()


def test_the_request_schema_knows_which_fields_a_client_set():
    """The rule's ground: a field counts as set when the client sent it, even at its default value."""
    request = ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "hi"}],
                                                    "temperature": 1.0})
    assert "temperature" in request.model_fields_set and "top_p" not in request.model_fields_set
