"""--int8: every linear layer and the LM head multiply in integers (W8A8, dynamic). Weights are int8 with one
scale per output feature, quantised once at load; activations are quantised to int8 per token at each call;
products are summed exactly in int32 and scaled back: by our AVX512-VNNI kernel (kernels/int8_matmul.c) from
weights packed for it at load, or elsewhere by `torch._int_mm` (oneDNN's VNNI or AMX kernels). On an
AVX512-VNNI CPU the products run at twice bfloat16's rate and read half its bytes; compiled, the activations'
quantisation fuses into the ops around each product. A row's result never depends on the other rows of the
batch. The embeddings stay as they are (a tied LM head gets an int8 copy: vocabulary x hidden bytes)."""

from __future__ import annotations

import time

import torch

from converters.linear_layers import QuantizationReport, replace_linears, weight_bytes
from kernels.int8_matmul import int8_matmul, pack_weight, runs_here

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
        if runs_here(quantised):
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
        row_scale = rows.abs().amax(dim=1, keepdim=True).float().clamp(min=SMALLEST_SCALE) / INT8_LEVELS
        quantised = torch.round(rows / row_scale).to(torch.int8)
        if self.compensation is None:
            product = torch._int_mm(quantised, self.weight)
        else:
            product = int8_matmul(quantised, self.weight, self.compensation, self.out_features)
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
