"""Compiled decode steps saved to disk and loaded by a later start (batching.saved_steps)."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch
from torch._dynamo.package import InlinedSource

from batching import KVArena, Slots, kv_layout
from batching.saved_steps import SavedSteps, changed_sources, forward_key
from batching.static_decode import DecodeForward, compiled_per_bucket
from config import Config
from model_manager import compile_choice
from tests.helpers.tiny_models import tiny_model
from converters.packed_linear import pack_linears
from tests.unit.test_speed_path import QUANTISATIONS, hqq_sized_model, needs_onednn_bfloat16, two_row_decode_step

CONVERSIONS = {"float32": (torch.float32, lambda model: None), "bfloat16": (torch.bfloat16, lambda model: None),
               **QUANTISATIONS, "packed bfloat16": (torch.bfloat16, pack_linears)}


def saved_step(forward: DecodeForward, folder) -> SavedSteps:
    step = compiled_per_bucket(forward, "default", [2], "test step", saved_in=folder)
    assert isinstance(step, SavedSteps)
    return step


@pytest.mark.parametrize("conversion", [pytest.param(name, marks=needs_onednn_bfloat16) if "packed" in name else name
                                        for name in CONVERSIONS])
def test_a_later_start_loads_the_saved_step_and_gets_the_eager_logits(conversion, tmp_path, caplog):
    """The second SavedSteps (a later start: dynamo's in-memory state reset) loads the file the first one saved
    instead of compiling, and both give the eager step's logits. Layers packed for oneDNN (bfloat16 on CPUs with
    its bfloat16 support, which this test was never run on) may be compiled at each start instead, with the same
    logits."""
    dtype, convert = CONVERSIONS[conversion]
    model = hqq_sized_model(1000, dtype)
    convert(model)
    forward, arguments = two_row_decode_step(model)
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2
    with torch.inference_mode():
        eager = forward(*arguments).float()
        first_start = saved_step(forward, tmp_path)
        first = first_start(*arguments).float()
        saved = list(tmp_path.glob("*/rows-2.pt2"))
        modified = [path.stat().st_mtime_ns for path in saved]
        torch._dynamo.reset()
        with caplog.at_level(logging.INFO, logger="batchwise.compile"):
            later_start = saved_step(forward, tmp_path)
            later = later_start(*arguments).float()
    torch.testing.assert_close(first, eager, atol=tolerance, rtol=tolerance)
    torch.testing.assert_close(later, eager, atol=tolerance, rtol=tolerance)
    if "packed" not in conversion:
        assert len(saved) == 1
    if saved:
        assert [path.stat().st_mtime_ns for path in saved] == modified
        assert f"loaded {saved[0]}" in caplog.text
        assert later_start.steps[2] is not later_start.fallback and first_start.steps[2] is not first_start.fallback


def test_a_step_dynamo_cannot_save_is_compiled_at_each_start(tmp_path):
    class Breaking(torch.nn.Module):
        def forward(self, rows: torch.Tensor) -> torch.Tensor:
            doubled = rows * 2
            torch._dynamo.graph_break()
            return doubled + 1

    forward = Breaking()
    compiled = compiled_per_bucket(forward, "default", [3], "breaking step", saved_in=tmp_path)
    assert torch.equal(compiled(torch.arange(3)), torch.tensor([1, 3, 5]))
    assert compiled.steps[3] is compiled.fallback
    assert not list(tmp_path.glob("*/*.pt2"))


def test_a_step_holding_what_the_key_cannot_describe_is_compiled_at_each_start(tmp_path):
    """An object of our own beside the modules (an encoder-decoder's family holding its model, LoRA's adapter rows)
    may hold anything the graph bakes in, unseen by the key: such a step is never saved."""
    class Holding(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.holder = SimpleNamespace(scale=3)

        def forward(self, rows: torch.Tensor) -> torch.Tensor:
            return rows * self.holder.scale

    compiled = compiled_per_bucket(Holding(), "default", [3], "holding step", saved_in=tmp_path)
    assert not isinstance(compiled, SavedSteps)
    assert torch.equal(compiled(torch.arange(3)), torch.tensor([0, 3, 6]))
    assert not list(tmp_path.iterdir())

    class Scale:  # an object of ours that names the attributes describing it (as int8's SharedProduct does)
        saved_step_key = ("scale",)

        def __init__(self, scale: int) -> None:
            self.scale = scale

    described = Holding()
    described.holder = Scale(3)
    key = forward_key(described, {})
    described.holder.scale = 4
    assert forward_key(described, {}) != key
    assert isinstance(compiled_per_bucket(described, "default", [3], "described step", saved_in=tmp_path), SavedSteps)
    with torch._inductor.config.patch(freezing=True):  # frozen weights would be constants of the saved graph
        assert not isinstance(compiled_per_bucket(described, "default", [3], "frozen", saved_in=tmp_path), SavedSteps)


def test_a_step_compiled_elsewhere_runs_eagerly_until_it_is_saved_then_loaded(tmp_path, caplog):
    """--torch-compile auto: the server compiles nothing; a bucket runs the eager forward until another process
    saves its step, which the next call loads (the eager logits again). A file that does not load counts as not
    saved (so a background compile is started for it), runs eagerly, is not replaced here, and is loaded once
    another process has replaced it."""
    model = tiny_model("llama", 100)
    forward, arguments = two_row_decode_step(model)
    with torch.inference_mode():
        eager = forward(*arguments)
        waiting = compiled_per_bucket(forward, "default", [2], "auto step", saved_in=tmp_path, compile_missing=False)
        assert torch.equal(waiting(*arguments), eager) and waiting.fallback is forward
        assert not waiting.saved(2) and not waiting.steps
        saved_step(forward, tmp_path)(*arguments)  # what the background process does
        [path] = tmp_path.glob("*/rows-2.pt2")
        with caplog.at_level(logging.INFO, logger="batchwise.compile"):
            taken_up = waiting(*arguments)
        assert f"loaded {path}" in caplog.text and waiting.steps[2] is not waiting.fallback
        torch.testing.assert_close(taken_up, eager, atol=1e-4, rtol=1e-4)

        path.write_bytes(b"not a compiled step")
        broken = compiled_per_bucket(forward, "default", [2], "auto step", saved_in=tmp_path, compile_missing=False)
        assert broken.saved(2)
        assert torch.equal(broken(*arguments), eager) and not broken.steps and not broken.saved(2)
        assert path.read_bytes() == b"not a compiled step"
        saved_step(forward, tmp_path)(*arguments)  # the background process compiles it again and replaces it
        assert broken.saved(2)
        torch.testing.assert_close(broken(*arguments), eager, atol=1e-4, rtol=1e-4)
        assert broken.steps[2] is not broken.fallback
    assert not list(tmp_path.glob("*/*.partial"))


def test_a_saved_step_that_no_longer_loads_is_compiled_again(tmp_path, caplog):
    model = tiny_model("llama", 100)
    forward, arguments = two_row_decode_step(model)
    with torch.inference_mode():
        eager = forward(*arguments)
        saved_step(forward, tmp_path)(*arguments)
        [path] = tmp_path.glob("*/rows-2.pt2")
        path.write_bytes(b"not a compiled step")
        torch._dynamo.reset()
        with caplog.at_level(logging.WARNING, logger="batchwise.compile"):
            again = saved_step(forward, tmp_path)(*arguments)
    assert f"{path} does not load" in caplog.text
    assert path.stat().st_size > 1000
    torch.testing.assert_close(again, eager, atol=1e-4, rtol=1e-4)


def test_a_saved_step_reads_the_weights_of_the_model_it_runs(tmp_path, caplog):
    """The key leaves the weights out: they are inputs of the graph, so a step saved with one model's weights runs
    another model of the same structure (a fine-tuned copy) with that model's weights."""
    with torch.inference_mode():
        forward, arguments = two_row_decode_step(tiny_model("llama", 100, seed=1))
        saved_step(forward, tmp_path)(*arguments)
        other, arguments = two_row_decode_step(tiny_model("llama", 100, seed=2))
        eager = other(*arguments)
        torch._dynamo.reset()
        with caplog.at_level(logging.INFO, logger="batchwise.compile"):
            later_start = saved_step(other, tmp_path)
            loaded = later_start(*arguments)
    assert "loaded" in caplog.text and later_start.steps[2] is not later_start.fallback
    torch.testing.assert_close(loaded, eager, atol=1e-4, rtol=1e-4)


def step_key(model: torch.nn.Module, slot_length: int = 32) -> str:
    arena = KVArena(kv_layout(model), 5 * slot_length, slots=Slots(4, slot_length))
    return forward_key(DecodeForward(model, arena), {"max_autotune": False})


def test_the_key_tells_apart_what_a_graph_holds_and_not_the_weights():
    """A saved step runs without guards: anything traced into the graph as a constant must change its key (dtype,
    a config value, a module's attribute, a tensor's shape); the weights are inputs, read at each call."""
    key = step_key(tiny_model("llama", 100, seed=0))
    assert step_key(tiny_model("llama", 100, seed=1)) == key
    assert step_key(tiny_model("llama", 100).to(torch.bfloat16)) != key
    assert step_key(tiny_model("llama", 100), slot_length=64) != key
    assert step_key(tiny_model("qwen2", 100)) != key
    model = tiny_model("llama", 100)
    model.config.rms_norm_eps = 1e-3
    assert step_key(model) != key
    model = tiny_model("llama", 100)
    model.model.layers[1].self_attn.scaling = 0.5
    assert step_key(model) != key
    assert forward_key(DecodeForward(tiny_model("llama", 100), KVArena(kv_layout(model), 160, slots=Slots(4, 32))),
                       {"max_autotune": True}) != key


def test_code_that_changed_since_a_step_was_traced_is_found(tmp_path):
    """Dynamo keeps the text of each module whose code it traced (ours and transformers'); a module that reads
    differently now is reported, and its saved steps are compiled again."""
    forward, arguments = two_row_decode_step(tiny_model("llama", 100))
    with torch.inference_mode():
        saved_step(forward, tmp_path)(*arguments)
    [path] = tmp_path.glob("*/rows-2.pt2")
    with path.open("rb") as file:
        sources = torch.compiler.load_compiled_function(file).source_info().inlined_sources
    assert {"batching.attention", "transformers.models.llama.modeling_llama"} <= {s.module for s in sources}
    assert changed_sources(sources) == []
    attention = next(source for source in sources if source.module == "batching.attention")
    edited = InlinedSource(attention.module, attention.firstlineno, attention.lastlineno, attention.checksum,
                           attention.content.replace("def ", "def  ", 1))
    assert changed_sources([edited]) == ["batching.attention"]


@pytest.mark.parametrize("settings, device, expected", [
    ({}, "cpu", "auto"), ({"torch_compile": True}, "cpu", True), ({"torch_compile": False}, "cpu", False),
    ({}, "cuda", False), ({"serving_type": "whisper"}, "cpu", False), ({"serving_type": "embedding"}, "cpu", False),
    ({"architecture_type": "encoder-decoder", "hf_model": "t5-small"}, "cpu", False),
    ({"model_type": "AutoModelForImageTextToText"}, "cpu", False), ({"enable_lora": True}, "cpu", False),
    ({"device_map": "auto"}, "cpu", False)])
def test_torch_compile_auto_stays_auto_only_where_steps_are_saved(settings, device, expected):
    """The default runs saved steps (and compiles them in the background) for a text decoder on the CPU; where
    steps are not saved, every start would compile again: there auto is false."""
    assert compile_choice(Config(**settings), torch.device(device)) == expected


def test_torch_compile_auto_is_false_without_the_compiler_inductor_calls():
    with torch._inductor.config.patch({"cpp.cxx": (None, "no-such-compiler++")}):
        assert compile_choice(Config(), torch.device("cpu")) is False
    assert compile_choice(Config(), torch.device("cpu")) == "auto"
