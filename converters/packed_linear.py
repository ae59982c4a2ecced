"""Linear layers whose bfloat16 weights are reordered once, at load time, into oneDNN's blocked layout, so
that no product repacks them: on CPU, every nn.Linear except the LM head (often tied to the embedding table:
packing it would keep a second copy). Measured on an AVX512-BF16 CPU for SmolLM2-135M's layer shapes, per layer: 1 row
197 -> 118 us, 8 rows 246 -> 162, 32 rows 468 -> 347, 256 rows 2068 -> 1922 (`torch.nn.functional.linear`
against `mkldnn._linear_pointwise` on the packed weight). The packed weight replaces the original: no
memory is added."""

from __future__ import annotations

import torch

from converters.linear_layers import replace_linears
from kernels.ops import kernel_op


def _product(x: torch.Tensor, packed_weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed_weight, bias, "none", [], "")


def _product_shape(x: torch.Tensor, packed_weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], packed_weight.shape[0])


# for torch.compile, which lowers oneDNN's product only for weights it packed itself (frozen graphs): an op it
# calls as it is
packed_product = kernel_op("packed_linear(Tensor x, Tensor packed_weight, Tensor? bias) -> Tensor",
                           _product, _product_shape)


class PackedLinear(torch.nn.Module):
    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        self.out_features, self.in_features = linear.weight.shape
        # named as nn.Linear names it, as IPEX's packed layers do: model code reads its layers' weight's dtype and
        # device (T5's feed-forward casts its input to its output layer's weight dtype); the shape and dtype are the
        # weight's, only the memory order is oneDNN's
        self.register_buffer("weight", torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), None),
                             persistent=False)
        self.bias = linear.bias

    @staticmethod
    def fits(linear: torch.nn.Linear) -> bool:
        weight = linear.weight
        return (weight.device.type == "cpu" and weight.dtype == torch.bfloat16
                and torch.ops.mkldnn._is_mkldnn_bf16_supported())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return packed_product(x, self.weight, self.bias)


def pack_linears(model: torch.nn.Module) -> int:
    """Pack every linear layer that fits (bfloat16 on a CPU with oneDNN's bfloat16 support); returns how many."""
    return replace_linears(model, lambda linear: PackedLinear(linear) if PackedLinear.fits(linear) else None)
