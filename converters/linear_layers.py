"""What the weight converters (HQQ and int8 quantisation, oneDNN packing) share: which linear layers they
replace, how the model's weights are counted once some are replaced, and what a quantisation reports."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


def replace_linears(model: torch.nn.Module, replacement: Callable[[torch.nn.Linear], torch.nn.Module | None]) -> int:
    """Every nn.Linear except the LM head and the layers the model keeps in float (its _keep_in_fp32_modules,
    which transformers' own quantisers leave alone: T5's feed-forward output, whose weight's dtype T5 casts its
    input to) replaced, in place, by what `replacement` makes of it (kept where it makes None); returns how many
    were replaced."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    kept = [f".{name}." for name in getattr(model, "_keep_in_fp32_modules", None) or ()]
    replaced = 0
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            path = f".{parent_name}.{name}."
            if isinstance(child, torch.nn.Linear) and child is not head and not any(k in path for k in kept):
                new = replacement(child)
                if new is not None:
                    setattr(parent, name, new)
                    replaced += 1
    return replaced


def stands_for_linear(module: torch.nn.Module) -> bool:
    """A replacement layer: it keeps the weight in another form than a parameter and says the float weight's
    shape (in_features, out_features), as HQQ's layers and ours do."""
    return not isinstance(module, torch.nn.Linear) and all(
        isinstance(getattr(module, name, None), int) for name in ("in_features", "out_features"))


def weight_count(model: torch.nn.Module) -> int:
    """The model's parameters, each replaced linear layer counted as the float weight it stands for."""
    replaced = [module for module in model.modules() if stands_for_linear(module)]
    held = {id(p) for module in replaced for p in module.parameters()}
    return (sum(module.in_features * module.out_features for module in replaced)
            + sum(p.numel() for p in model.parameters() if id(p) not in held))


@dataclass
class QuantizationReport:
    method: str
    layers: int
    bytes_before: int
    bytes_after: int
    seconds: float
    detail: str = ""  # after the layer count: the kernels, the layers beyond the count

    def describe(self) -> str:
        return (f"{self.method} quantised {self.layers} linear layers{self.detail} in {self.seconds:.1f} s: weights "
                f"{self.bytes_before / 2**20:.0f} MiB -> {self.bytes_after / 2**20:.0f} MiB")


def weight_bytes(model: torch.nn.Module) -> int:
    """Parameters and buffers (each once), plus the packed weights and scales that HQQ layers keep as plain
    attributes."""
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
