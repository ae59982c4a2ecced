"""Compiled decode steps saved to disk and loaded by a later start (batching.saved_steps)."""

from __future__ import annotations

import hashlib
import logging
from types import SimpleNamespace

import pytest
import torch
from torch._dynamo.package import InlinedSource

from batching import KVArena, Slots, kv_layout
from batching.saved_steps import SavedSteps, changed_sources, forward_key
from batching.static_decode import DecodeForward, compiled_per_bucket
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
        first = saved_step(forward, tmp_path)(*arguments).float()
        saved = list(tmp_path.glob("*/rows-2.pt2"))
        modified = [path.stat().st_mtime_ns for path in saved]
        torch._dynamo.reset()
        with caplog.at_level(logging.INFO, logger="batchwise.compile"):
            later = saved_step(forward, tmp_path)(*arguments).float()
    torch.testing.assert_close(first, eager, atol=tolerance, rtol=tolerance)
    torch.testing.assert_close(later, eager, atol=tolerance, rtol=tolerance)
    if "packed" not in conversion:
        assert len(saved) == 1
    if saved:
        assert [path.stat().st_mtime_ns for path in saved] == modified
        assert f"loaded {saved[0]}" in caplog.text


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
    assert f"compiling {path} again" in caplog.text
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
            loaded = saved_step(other, tmp_path)(*arguments)
    assert "loaded" in caplog.text
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


def test_code_that_changed_since_a_step_was_traced_is_found():
    """Dynamo records each traced function's line range and checksum; a range that reads differently now is
    reported (a saved step is then compiled again)."""
    lines = open(changed_sources.__code__.co_filename).read().splitlines(keepends=True)
    first, last = changed_sources.__code__.co_firstlineno, changed_sources.__code__.co_firstlineno + 5
    checksum = hashlib.sha256("".join(lines[first - 1:last - 1]).encode()).hexdigest()
    source = InlinedSource("batching.saved_steps", first, last, checksum, content="")
    assert changed_sources({source}) == []
    moved = InlinedSource("batching.saved_steps", first + 1, last + 1, checksum, content="")
    assert changed_sources({moved}) == [f"batching.saved_steps line {first + 1}"]
