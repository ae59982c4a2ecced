"""HQQ weight-only quantisation of a model's linear layers (not the embeddings or the LM head), through the
hqq package. On CUDA, 4-bit layers in bfloat16 are repacked for torch's int4 matmul kernel (hqq's
torchao_int4 backend); elsewhere HQQ de-quantises each weight on the fly (less memory, more compute)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from hqq.core.quantize import BaseQuantizeConfig, HQQLinear
from hqq.utils.patching import prepare_for_inference

logger = logging.getLogger("batchwise.model")


@dataclass
class QuantizationReport:
    layers: int
    bytes_before: int
    bytes_after: int
    backend: str
    seconds: float

    def describe(self) -> str:
        return (f"HQQ quantised {self.layers} linear layers in {self.seconds:.1f} s ({self.backend}): weights "
                f"{self.bytes_before / 2**20:.0f} MiB -> {self.bytes_after / 2**20:.0f} MiB")


def weight_bytes(model: torch.nn.Module) -> int:
    """Parameters and buffers, plus the packed weights and scales that HQQ layers keep as plain attributes."""
    total = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    for module in model.modules():
        for name in ("W_q", "weight_int4pack", "scales_and_zeros"):
            tensor = getattr(module, name, None)
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
        for tensor in (getattr(module, "meta", None) or {}).values():
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total


def quantize_linears(model: torch.nn.Module, nbits: int, group_size: int) -> QuantizationReport:
    """Replace every nn.Linear except the LM head by its HQQ-quantised version, in place."""
    started = time.perf_counter()
    before = weight_bytes(model)
    config = BaseQuantizeConfig(nbits=nbits, group_size=group_size, axis=1)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    layers = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.Linear) and child is not head:
                setattr(parent, name, HQQLinear(child, config, compute_dtype=model.dtype, device=str(model.device)))
                layers += 1
    backend = "de-quantised on the fly"
    if model.device.type == "cuda" and model.dtype == torch.bfloat16 and nbits == 4:
        prepare_for_inference(model, backend="torchao_int4")
        backend = "torch int4 kernels"
    return QuantizationReport(layers, before, weight_bytes(model), backend, time.perf_counter() - started)
