"""--int8: every linear layer and the LM head multiply in integers (W8A8, dynamic). Weights are int8 with one
scale per output feature, quantised once at load; activations are quantised to int8 per token at each call;
products are summed exactly in int32 and scaled back. On a CPU with AVX512-VNNI one C call does all of it
(kernels/int8_linear.c, from weights packed for it at load); elsewhere torch operations around
`torch._int_mm` (oneDNN's VNNI or AMX kernels) do, and compiled graphs fuse them. The products run at twice
bfloat16's rate and read half its bytes. A row's result never depends on the other rows of the
batch. The embeddings stay as they are (a tied LM head gets an int8 copy: vocabulary x hidden bytes)."""

from __future__ import annotations

import time

import torch

from converters.linear_layers import QuantizationReport, replace_linears, weight_bytes
from kernels.int8_linear import int8_linear, pack_weight, runs_here

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if self.compensation is not None:
            output = int8_linear(rows, self.weight, self.compensation, self.scale, self.bias)
            return output.reshape(*x.shape[:-1], self.out_features)
        row_scale = rows.abs().amax(dim=1, keepdim=True).float().clamp(min=SMALLEST_SCALE) / INT8_LEVELS
        quantised = torch.round(rows / row_scale).to(torch.int8)
        product = torch._int_mm(quantised, self.weight)
        output = (product * row_scale * self.scale).to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        return output if self.bias is None else output + self.bias


def quantize_int8(model: torch.nn.Module) -> QuantizationReport:
    """Replace every nn.Linear, the LM head included, by its Int8Linear, in place."""
    started = time.perf_counter()
    before = weight_bytes(model)
    layers = replace_linears(model, Int8Linear)
    model.set_output_embeddings(Int8Linear(model.get_output_embeddings()))
    return QuantizationReport("int8 (W8A8)", layers, before, weight_bytes(model), time.perf_counter() - started,
                              " and the LM head")
