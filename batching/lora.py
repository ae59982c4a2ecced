"""Batched LoRA: rows of one forward that use different adapters (or none) share it. Every linear layer of the
model (but the LM head) is wrapped once, at start-up, in a LoraLinear holding all adapter slots' weights side by
side: A as [slots x rank, in] and B as [out, slots x rank], each adapter zero-padded to the largest rank and its
scaling folded into B, so that shapes never change when adapters come and go (torch.compile keeps its graphs).

A forward computes the base product once, then every token's low-rank update in two products over all slots at
once, the columns of the slots a token does not use masked to zero. On CPU that beat, for 32 rows over 4 adapters
of rank 16 (SmolLM2's shapes, float32, one thread, best of 50), both gathering each token's A and B for a batched
product (884 / 1510 / 1707 us for the 576->576, 576->1536, 1536->576 layers) and a product per adapter over its
rows (139 / 168 / 177): 73 / 122 / 121 us; at 256 rows the grouped products come out slightly ahead (368 / 523 /
628 against 426 / 743 / 775), the gathers far behind. The mask is computed once per forward (AdapterRows) from
each token's adapter slot, -1 for none; a forward where no token uses an adapter skips the update (eagerly: the
compiled static step always computes it, its shapes fixed)."""

from __future__ import annotations

import contextlib
from typing import ClassVar, Iterator

import torch
import torch.nn.functional as F
from transformers.pytorch_utils import Conv1D

NO_ADAPTER = -1


class AdapterRows:
    """The forward's per-token adapter selection, shared by every LoraLinear: None, or a mask [tokens, slots x
    rank] of the columns each token keeps. Set around each forward (by the runner, or inside the compiled static
    step from its adapter input, so that it is a traced tensor and not a constant of the graph)."""

    def __init__(self, slots: int, rank: int) -> None:
        self.slots = slots
        self.rank = rank
        self.mask: torch.Tensor | None = None

    def column_slots(self, device: torch.device) -> torch.Tensor:
        return torch.arange(self.slots * self.rank, device=device) // self.rank

    def select(self, adapters: torch.Tensor, dtype: torch.dtype) -> None:
        """For the next forward: adapters [tokens], each token's slot or NO_ADAPTER (clear() after it)."""
        self.mask = (adapters[:, None] == self.column_slots(adapters.device)).to(dtype)

    def clear(self) -> None:
        self.mask = None


def linear_shape(module: torch.nn.Module) -> tuple[int, int] | None:
    """(in, out) of a linear layer: nn.Linear, GPT-2's Conv1D, or a converter's replacement (int8, HQQ, packed)
    that says the float weight's shape; None for anything else."""
    if isinstance(module, torch.nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, Conv1D):
        return module.weight.shape[0], module.nf
    features = (getattr(module, "in_features", None), getattr(module, "out_features", None))
    return features if all(isinstance(f, int) for f in features) else None


class LoraLinear(torch.nn.Module):
    """A linear layer plus each token's low-rank update for its adapter slot (none: zero)."""

    # the step's adapter mask reaches it from beside the layer (AdapterRows), not as a layer input, which a layer
    # region (batching.layer_regions) cannot trace
    compiles_in_layer_region: ClassVar[bool] = False

    def __init__(self, base: torch.nn.Module, rows: AdapterRows, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.base = base
        self.rows = rows
        self.in_size, self.out_size = linear_shape(base)
        columns = rows.slots * rows.rank
        self.register_buffer("lora_a", torch.zeros(columns, self.in_size, dtype=dtype, device=device),
                             persistent=False)
        self.register_buffer("lora_b", torch.zeros(self.out_size, columns, dtype=dtype, device=device),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        output = self.base(x)
        mask = self.rows.mask
        if mask is None:
            return output
        low_rank = F.linear(x.to(self.lora_a.dtype), self.lora_a) * mask.view(*x.shape[:-1], -1)
        return output + F.linear(low_rank, self.lora_b).to(output.dtype)

    def write(self, slot: int, a: torch.Tensor | None, b: torch.Tensor | None) -> None:
        """The slot's A ([rank, in]) and scaled B ([out, rank]); None: the adapter leaves this layer alone."""
        columns = slice(slot * self.rows.rank, (slot + 1) * self.rows.rank)
        self.lora_a[columns] = 0
        self.lora_b[:, columns] = 0
        if a is not None:
            rank = a.shape[0]
            self.lora_a[columns][:rank] = a.to(self.lora_a)
            self.lora_b[:, columns][:, :rank] = b.to(self.lora_b)


class LoraLayers:
    """The model's linear layers wrapped for `slots` adapters of rank up to `rank`, by module name."""

    def __init__(self, model: torch.nn.Module, slots: int, rank: int) -> None:
        self.rows = AdapterRows(slots, rank)
        self.layers: dict[str, LoraLinear] = {}
        head = model.get_output_embeddings()
        embedding = model.get_input_embeddings().weight
        dtype = embedding.dtype
        for parent_name, parent in list(model.named_modules()):
            for name, child in list(parent.named_children()):
                if child is head or isinstance(child, LoraLinear) or linear_shape(child) is None:
                    continue
                device = next(iter([*child.parameters(), *child.buffers()]), embedding).device
                layer = LoraLinear(child, self.rows, dtype, device)
                setattr(parent, name, layer)
                self.layers[f"{parent_name}.{name}" if parent_name else name] = layer

    @property
    def slots(self) -> int:
        return self.rows.slots

    @property
    def rank(self) -> int:
        return self.rows.rank

    def write(self, slot: int, weights: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Fill the slot: module name -> (A, scaled B); every other layer's slot is zeroed."""
        with torch.inference_mode():
            for name, layer in self.layers.items():
                layer.write(slot, *weights.get(name, (None, None)))

    @contextlib.contextmanager
    def selected(self, adapters: list[int], device: torch.device, dtype: torch.dtype) -> Iterator[None]:
        """Around an eager forward: the tokens' adapter slots (none selected when no token has one)."""
        if any(slot != NO_ADAPTER for slot in adapters):
            self.rows.select(torch.tensor(adapters, dtype=torch.long, device=device), dtype)
        try:
            yield
        finally:
            self.rows.clear()
