"""--int8: every linear layer and the LM head multiply in integers (W8A8, dynamic). Weights are int8 with one
scale per output feature, quantised once at load; activations are quantised to int8 per token at each call;
products are summed exactly in int32 and scaled back. On a CPU with AVX512-VNNI one C call does all of it
(kernels/int8_linear.c, from weights packed for it at load); elsewhere torch operations around
`torch._int_mm` (oneDNN's VNNI or AMX kernels) do, and compiled graphs fuse them. The products run at twice
bfloat16's rate and read half its bytes. A row's result never depends on the other rows of the
batch. The embeddings stay as they are (a tied LM head gets an int8 copy: vocabulary x hidden bytes)."""

from __future__ import annotations

import time
from typing import ClassVar

import torch

from converters.linear_layers import QuantizationReport, replace_linears, weight_bytes
from kernels.int8_linear import LANES, int8_linear, pack_weight, runs_here

INT8_LEVELS = 127  # symmetric: -127 .. 127
SMALLEST_SCALE = 1e-12  # an all-zero row or weight stays zero instead of dividing by zero


class Int8Linear(torch.nn.Module):
    """y = (round(x / sx) . round(W / sw)^T) x sx x sw + bias, sx per token, sw per output feature."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        weight = linear.weight.detach().float()
        self.out_features, self.in_features = weight.shape
        scale = weight.abs().amax(dim=1).clamp(min=SMALLEST_SCALE) / INT8_LEVELS
        quantised = torch.round(weight / scale[:, None]).to(torch.int8)
        bias_fits = linear.bias is None or linear.bias.dtype == linear.weight.dtype  # as the kernel adds it
        if runs_here(quantised, linear.weight.dtype) and bias_fits:
            packed, compensation = pack_weight(quantised)
            self.register_buffer("weight", packed)
            self.register_buffer("compensation", compensation)
        else:
            # input-major ([in, out]): oneDNN's int8 product reads it 1.1-1.5x faster for 2 or more rows (and the
            # LM head 1.4x at 32 rows), 2-3x slower for a single row than the usual [out, in]; a server batches
            self.register_buffer("weight", quantised.t().contiguous())
            self.register_buffer("compensation", None)
        self.register_buffer("scale", scale)
        self.bias = linear.bias
        self.shared: SharedProduct | None = None  # the product this layer shares with its siblings, if any
        self.columns = (0, self.out_features)  # its columns of that product

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.shared is not None:
            return self.shared.columns(self, x)
        rows = x.reshape(-1, self.in_features)
        if self.compensation is not None:
            output = int8_linear(rows, self.weight, self.compensation, self.scale, self.bias)
            return output.reshape(*x.shape[:-1], self.out_features)
        row_scale = rows.abs().amax(dim=1, keepdim=True).float().clamp(min=SMALLEST_SCALE) / INT8_LEVELS
        quantised = torch.round(rows / row_scale).to(torch.int8)
        product = torch._int_mm(quantised, self.weight)
        output = (product * row_scale * self.scale).to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        return output if self.bias is None else output + self.bias


# Layers that read the same input, multiplied in one kernel call: a decoder layer's query, key and value
# projections, and its MLP's gate and up projections. SmolLM2-135M's one-row step made 211 int8 calls, 121 once
# fused; a small product pays a fixed cost (the op's dispatch, the threads' start) that a bigger one shares.
#
# Each projection stays the module it was, under its own name (LoRA adapters, weight counts and reports find it
# unchanged), with its weights as views into the group's side-by-side weights, so nothing is stored twice. The
# first layer of a group that the model calls computes the whole product; the others take their columns of it
# while the input is the same tensor. A token's quantisation depends on that token alone, so every column holds
# the bits its layer gives by itself.
SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class SharedProduct:
    """The product of several Int8Linear layers over one input (see SIBLINGS). A plain object, not a module: the
    layers hold views of its weights, and the model's buffers count each byte once."""

    # what a compiled step's graph may take from it (batching.saved_steps); input, output and taken change per call
    saved_step_key: ClassVar[tuple[str, ...]] = ("layers", "weight", "compensation", "scale", "bias")

    def __init__(self, layers: list[Int8Linear]) -> None:
        self.layers = layers
        self.weight = torch.cat([layer.weight for layer in layers])
        self.compensation = torch.cat([layer.compensation for layer in layers])
        self.scale = torch.cat([layer.scale for layer in layers])
        self.bias = None if layers[0].bias is None else torch.cat([layer.bias.detach() for layer in layers])
        self.input: torch.Tensor | None = None
        self.output: torch.Tensor | None = None
        self.taken = 0
        start = 0
        for layer in layers:
            end = start + layer.out_features
            layer.weight = self.weight[start // LANES:end // LANES]
            layer.compensation = self.compensation[start:end]
            layer.scale = self.scale[start:end]
            if self.bias is not None:
                layer.bias = torch.nn.Parameter(self.bias[start:end], requires_grad=False)
            layer.shared, layer.columns = self, (start, end)
            start = end

    def columns(self, layer: Int8Linear, x: torch.Tensor) -> torch.Tensor:
        """`layer`'s output for x, [..., in] -> [..., out]: its columns of the group's product."""
        if self.input is not x:
            self.input = x
            self.output = int8_linear(x.reshape(-1, layer.in_features), self.weight, self.compensation, self.scale,
                                      self.bias)
            self.taken = 0
        start, end = layer.columns
        columns = self.output[:, start:end].reshape(*x.shape[:-1], end - start)
        self.taken += 1
        if self.taken == len(self.layers):  # every layer has its columns: hold nothing between calls
            self.input = self.output = None
        return columns


def share_inputs(model: torch.nn.Module) -> int:
    """Fuse every group of SIBLINGS that are Int8Linear layers on the C kernel with the same input size, bias or
    none, and outputs in whole packed blocks; returns how many groups. Not in encoder-decoder models, whose
    cross-attention projects keys and values from another input than its queries."""
    if getattr(model.config, "is_encoder_decoder", False):
        return 0
    groups = 0
    for module in model.modules():
        for names in SIBLINGS:
            layers = [getattr(module, name, None) for name in names]
            if all(fusable(layer) for layer in layers) and len({(layer.in_features, layer.bias is None)
                                                                 for layer in layers}) == 1:
                SharedProduct(layers)
                groups += 1
    return groups


def fusable(layer: object) -> bool:
    return (isinstance(layer, Int8Linear) and layer.compensation is not None and layer.shared is None
            and layer.out_features % LANES == 0)


def quantize_int8(model: torch.nn.Module) -> QuantizationReport:
    """Replace every nn.Linear, the LM head included, by its Int8Linear, in place."""
    started = time.perf_counter()
    before = weight_bytes(model)
    layers = replace_linears(model, Int8Linear)
    model.set_output_embeddings(Int8Linear(model.get_output_embeddings()))
    groups = share_inputs(model)
    fused = f" ({groups} groups of layers that read one input fused)" if groups else ""
    return QuantizationReport("int8 (W8A8)", layers, before, weight_bytes(model), time.perf_counter() - started,
                              " and the LM head" + fused)
