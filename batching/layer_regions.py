"""Decoder layers that torch.compile traces once for all of them. In the static decode step every decoder layer runs
the same code on tensors of the same shapes; only its weights and its K/V differ. So each layer runs as a nested
compile region (torch.compiler.nested_compile_region) whose inputs are exactly those tensors: dynamo traces the
first layer and stamps the others out, and inductor compiles one layer's kernels, not 30 layers' (the embedded
SmolLM2-135M with --torch-compile in float32 on 2 AVX2 cores, 7 buckets: ready in 191 s instead of 503 s on the
first start, 75 s instead of 97 s from the disk caches; the same step times).

Dynamo reuses a region only where its inputs are tensors, constants and modules, so a layer's K/V reach it as
tensors, wrapped inside in a StaticDecodeStep of that layer alone, rather than picked by the layer's index from the
whole step. The layer reaches the region as the `self` of its forward: a module captured in a closure was stamped
out with the first layer's weights (torch 2.13). A layer that matches no earlier one (another attention kind) is
traced on its own, as without regions. Outside torch.compile a region is a plain call."""

from __future__ import annotations

from types import MethodType
from typing import Any, Callable

import torch
from transformers.modeling_layers import GradientCheckpointingLayer

from batching.attention import StaticDecodeStep


def trace_layers_once(model: torch.nn.Module) -> None:
    """Route the model's decoder layers through the shared region when a StaticDecodeStep runs them (every other
    step calls the layer as before). Left alone: a layer whose forward is already replaced (accelerate's hooks), and
    one holding a module that cannot run in a region (its class says so: compiles_in_layer_region = False)."""
    for layer in model.modules():
        if not isinstance(layer, GradientCheckpointingLayer) or "forward" in vars(layer) or not all(
                getattr(module, "compiles_in_layer_region", True) for module in layer.modules()):
            continue
        index = _attention_index(layer)
        if index is not None:
            layer.forward = MethodType(_forward_of_layer(index), layer)


def _attention_index(layer: torch.nn.Module) -> int | None:
    """The layer index of the layer's attention, where it holds exactly one."""
    indices = {module.layer_idx for module in layer.modules() if isinstance(getattr(module, "layer_idx", None), int)}
    return indices.pop() if len(indices) == 1 else None


def _forward_of_layer(index: int) -> Callable[..., Any]:
    def forward(layer: torch.nn.Module, hidden_states: torch.Tensor, *args, batchwise_step: Any = None,
                **kwargs) -> Any:
        if not isinstance(batchwise_step, StaticDecodeStep):
            if batchwise_step is not None:
                kwargs["batchwise_step"] = batchwise_step
            return type(layer).forward(layer, hidden_states, *args, **kwargs)
        step = batchwise_step
        return _layer_region(layer, hidden_states, step.keys[index], step.values[index], step.slot_length,
                             step.lengths, step.positions, step.starts, *args, **kwargs)
    return forward


# more entries than any model has layers: a layer that matches no traced one is traced, never an error
@torch.compiler.nested_compile_region(max_reuse_entries=1024)
def _layer_region(layer: torch.nn.Module, hidden_states: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                  slot_length: int, lengths: torch.Tensor, positions: torch.Tensor, starts: torch.Tensor, *args,
                  **kwargs) -> Any:
    step = StaticDecodeStep([keys], [values], slot_length, lengths, positions, starts)
    return type(layer).forward(layer, hidden_states, *args, batchwise_step=step, **kwargs)
