"""--device-map through accelerate: a tiny model placed by a device map (over the CPU here; over GPUs the same
code keeps each layer's K/V on its layer's device) generates what the model placed by hand does, and a model
that would spill to disk is refused with the reason."""

import pytest

from config import Config
from model_manager import ModelLoadError, load_model
from tests.helpers.engine import generate_all, greedy, make_engine, run_with_engine
from tests.helpers.tiny_models import tiny_model


@pytest.fixture(scope="module")
def tiny_folder(tokenizer, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-model")
    tiny_model("llama", len(tokenizer), seed=5).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def greedy_outputs(loaded, prompts) -> list[list[int]]:
    seqs = run_with_engine(lambda: make_engine(loaded.model, loaded.tokenizer),
                           lambda engine: generate_all(engine, prompts, greedy(12)))
    return [seq.output_ids for seq in seqs]


def test_a_device_mapped_model_generates_what_the_plain_one_does(tiny_folder, tokenizer):
    prompts = [tokenizer(text).input_ids for text in ("Hello there", "The capital of France is", "1, 2, 3,")]
    plain = load_model(Config(hf_model=str(tiny_folder)))
    mapped = load_model(Config(hf_model=str(tiny_folder), device_map="auto", max_memory="cpu=8GiB"))
    layout_devices = make_engine(mapped.model, mapped.tokenizer).runner.arena.layout.devices
    assert {device.type for device in layout_devices} == {"cpu"} and len(layout_devices) == 2
    assert greedy_outputs(mapped, prompts) == greedy_outputs(plain, prompts)


def test_a_model_that_would_spill_to_disk_is_refused(tiny_folder):
    with pytest.raises(ModelLoadError, match="offloaded to disk"):
        load_model(Config(hf_model=str(tiny_folder), device_map="auto", max_memory="cpu=2KB"))
