"""HQQ weight-only quantisation of a model's linear layers (not the embeddings or the LM head), through the
hqq package. 4-bit layers in bfloat16 multiply by torch's int4 kernels, which unpack the weights inside the
product: on CPU `_weight_int4pack_mm_for_cpu` (Int4Linear below), on CUDA hqq's torchao_int4 backend.
Elsewhere (other bit widths or dtypes: the CPU kernel has no vectorised path for float32 or float16, and runs
10-40x slower than a float32 matmul there) HQQ de-quantises each weight on the fly: less memory, more compute."""

from __future__ import annotations

import logging
import time
from typing import ClassVar

import torch
from hqq.core.quantize import BaseQuantizeConfig, HQQLinear, Quantizer
from hqq.utils.patching import prepare_for_inference

from converters.linear_layers import QuantizationReport, replace_linears, weight_bytes

logger = logging.getLogger("batchwise.model")

# torch's CPU int4 packing takes output features in multiples of 16, and a tiling along the input features
# (2, 4 and 8 measured alike for SmolLM2's layers at 1 and 32 rows)
CPU_INT4_OUTPUT_MULTIPLE = 16
CPU_INT4_INNER_K_TILES = 2


class Int4Linear(torch.nn.Module):
    """A linear layer whose weight HQQ quantised to 4 bits in groups along the input features, multiplied by
    torch's CPU int4 kernel. HQQ's weight is (q - zero) x scale; the kernel's is (q - 8) x scale + offset, so
    offset = (8 - zero) x scale."""

    # inside a layer region (batching.layer_regions) inductor hands the kernel its group size as a tensor, which it
    # refuses at run time (torch 2.13)
    compiles_in_layer_region: ClassVar[bool] = False

    def __init__(self, linear: torch.nn.Linear, quant_params: dict) -> None:
        super().__init__()
        weight = linear.weight.data
        self.out_features, self.in_features = weight.shape
        self.group_size = quant_params["group_size"]
        quantised, meta = Quantizer.quantize(weight, **quant_params, bitpack=False, compute_dtype=weight.dtype,
                                             device=str(weight.device))
        levels = quantised.reshape(self.out_features, self.in_features).to(torch.int32)
        scale = meta["scale"].float().reshape(self.out_features, -1)
        offset = (8 - meta["zero"].float().reshape(self.out_features, -1)) * scale
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(levels, CPU_INT4_INNER_K_TILES)
        self.register_buffer("packed", packed)
        self.register_buffer("scales_and_offsets",
                             torch.stack([scale, offset], dim=-1).transpose(0, 1).contiguous().to(weight.dtype))
        self.bias = linear.bias

    @staticmethod
    def fits(linear: torch.nn.Linear, nbits: int, group_size: int) -> bool:
        out_features, in_features = linear.weight.shape
        return (nbits == 4 and linear.weight.device.type == "cpu" and linear.weight.dtype == torch.bfloat16
                and in_features % group_size == 0 and out_features % CPU_INT4_OUTPUT_MULTIPLE == 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        product = torch.ops.aten._weight_int4pack_mm_for_cpu(x.reshape(-1, x.shape[-1]).contiguous(), self.packed,
                                                              self.group_size, self.scales_and_offsets)
        output = product.reshape(*x.shape[:-1], self.out_features)
        return output if self.bias is None else output + self.bias


def quantize_linears(model: torch.nn.Module, nbits: int, group_size: int) -> QuantizationReport:
    """Replace every nn.Linear except the LM head by its HQQ-quantised version, in place."""
    started = time.perf_counter()
    before = weight_bytes(model)
    config = BaseQuantizeConfig(nbits=nbits, group_size=group_size, axis=1)

    def quantised(linear: torch.nn.Linear) -> torch.nn.Module:
        if Int4Linear.fits(linear, nbits, group_size):
            return Int4Linear(linear, config["weight_quant_params"])
        return HQQLinear(linear, config, compute_dtype=model.dtype, device=str(model.device))

    layers = replace_linears(model, quantised)
    on_cpu_kernel = sum(isinstance(module, Int4Linear) for module in model.modules())
    counts = {"torch's CPU int4 kernel": on_cpu_kernel, "de-quantised on the fly": layers - on_cpu_kernel}
    backend = ", ".join(f"{kind} for {count}" for kind, count in counts.items() if count)
    if model.device.type == "cuda" and model.dtype == torch.bfloat16 and nbits == 4:
        prepare_for_inference(model, backend="torchao_int4")
        backend = "torch int4 kernels"
    return QuantizationReport("HQQ", layers, before, weight_bytes(model), time.perf_counter() - started,
                              f" ({backend})")
