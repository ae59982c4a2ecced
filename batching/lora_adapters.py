"""LoRA adapters by name: PEFT adapter folders read with peft's own config and weight loaders, checked against
the model and the slots (--max-loras, --max-lora-rank), and written into a free slot of the LoRA layers. A
sequence names its adapter (LoraAdapter); the prefix cache keys its K/V by the adapter's `key`, new at every load,
so a name loaded again from another folder never meets K/V computed with the old weights.

Unloading frees the name at once (new requests get a 404); the slot stays with the sequences still using it and
is given to a new adapter only once none does."""

from __future__ import annotations

import itertools
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from typing import TYPE_CHECKING

import torch

from batching.lora import LoraLayers

if TYPE_CHECKING:
    from peft import LoraConfig

logger = logging.getLogger("batchwise.lora")

PEFT_PREFIX = "base_model.model."


class AdapterError(ValueError):
    """An adapter that cannot be served here, and why (a 400 for a client, a start-up failure for a flag); `param`:
    the load request's field at fault."""

    def __init__(self, message: str, param: str = "lora_path") -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True, eq=False)
class LoraAdapter:
    name: str
    path: str
    slot: int
    rank: int
    key: int  # this load's own: the prefix cache's namespace for the K/V computed with it


_keys = itertools.count(1)


def read_adapter(path: str, layers: LoraLayers, base_model: str) -> tuple[dict[str, tuple[torch.Tensor,
                                                                                            torch.Tensor]], int]:
    """The adapter's (A, B x scaling) per module name of the model, and its largest rank; AdapterError when peft
    cannot read it or the model cannot serve it."""
    from peft.utils import load_peft_weights  # peft takes seconds to import: only servers reading adapters do
    from peft.utils.other import get_pattern_key
    config = read_config(path)
    trained_on = config.base_model_name_or_path
    if trained_on and Path(trained_on).name != Path(base_model).name:
        # a warning, not a refusal: the same weights go by many names (hub id, local copy, GGUF conversion); the
        # shapes checked below are what must fit
        logger.warning("the adapter in %s was trained on %s, and this server serves %s", path, trained_on,
                       base_model)
    try:
        state = load_peft_weights(path, device="cpu")
    except (OSError, ValueError) as error:
        raise AdapterError(f"cannot read the adapter weights in {path}: {error}") from None
    modules = sorted({key.removeprefix(PEFT_PREFIX).rsplit(".lora_", 1)[0] for key in state})
    missing = [module for module in modules if module not in layers.layers]
    if missing:
        raise AdapterError(f"the adapter in {path} adapts modules this model has no linear layer for: "
                           f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''} (is it for another base "
                           f"model than {base_model}?)")
    if [key for key in state if ".lora_A." not in key and ".lora_B." not in key]:
        raise AdapterError(f"the adapter in {path} holds weights beyond LoRA's A and B matrices (modules_to_save, "
                           "embedding or bias weights), which are not served")
    weights, largest = {}, 0
    for module in modules:
        a, b = (state[f"{PEFT_PREFIX}{module}.lora_{part}.weight"] for part in "AB")
        rank = a.shape[0]
        in_size, out_size = layers.layers[module].in_size, layers.layers[module].out_size
        if a.shape != (rank, in_size) or b.shape != (out_size, rank):
            raise AdapterError(f"the adapter in {path} has {module} weights of shapes {list(a.shape)} and "
                               f"{list(b.shape)}, but the model's {module} maps {in_size} to {out_size} features "
                               f"(is it for another base model than {base_model}?)")
        alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), module), config.lora_alpha)
        scaling = alpha / math.sqrt(rank) if config.use_rslora else alpha / rank
        weights[module] = (a.float(), b.float() * scaling)
        largest = max(largest, rank)
    if not weights:
        raise AdapterError(f"the adapter in {path} adapts none of this model's linear layers")
    if largest > layers.rank:
        raise AdapterError(f"the adapter in {path} has rank {largest}, more than this server's --max-lora-rank "
                           f"{layers.rank}")
    return weights, largest


def read_config(path: str) -> LoraConfig:
    """The adapter's adapter_config.json, read by peft: a plain LoRA adapter, or AdapterError with the reason."""
    from peft import LoraConfig, PeftConfig
    if not (Path(path) / "adapter_config.json").is_file():
        raise AdapterError(f"no PEFT adapter at {path}: adapter_config.json not found")
    try:
        config = PeftConfig.from_pretrained(path)
    except (OSError, ValueError, TypeError) as error:
        raise AdapterError(f"cannot read the adapter config in {path}: {error}") from None
    if not isinstance(config, LoraConfig):
        raise AdapterError(f"the adapter in {path} is of PEFT type {config.peft_type}: only LoRA adapters are served")
    unsupported = {
        "DoRA (use_dora)": config.use_dora, f"bias={config.bias!r}": config.bias != "none",
        "modules_to_save": bool(config.modules_to_save),
        "lora_bias": config.lora_bias, "trainable_token_indices": bool(config.trainable_token_indices),
    }
    refused = [name for name, present in unsupported.items() if present]
    if refused:
        raise AdapterError(f"the adapter in {path} uses {', '.join(refused)}, which is not served: only plain LoRA "
                           "(bias='none')")
    return config


class LoraAdapters:
    """The adapters the server holds, by name; `in_use(slot)` tells whether a running or waiting sequence still
    uses a slot (the engine's, wired by the service)."""

    def __init__(self, layers: LoraLayers, base_names: tuple[str, ...],
                 in_use: Callable[[int], bool] = lambda slot: False) -> None:
        """base_names: what clients call the base model (no adapter may take them)."""
        self.layers = layers
        self.base_names = base_names
        self.base_model = base_names[0]
        self.in_use = in_use
        self.by_name: dict[str, LoraAdapter] = {}

    def load(self, name: str, path: str) -> LoraAdapter:
        """Read the adapter and write it into a free slot (run on the torch thread: the slot's weights change
        between steps, never during one)."""
        if name in self.base_names:
            raise AdapterError(f"{name!r} is the base model's name: give the adapter another", "lora_name")
        if name in self.by_name:
            raise AdapterError(f"an adapter named {name!r} is already loaded (from {self.by_name[name].path}): "
                               "unload it first", "lora_name")
        weights, rank = read_adapter(path, self.layers, self.base_model)
        slot = self._free_slot()
        self.layers.write(slot, weights)
        adapter = LoraAdapter(name, path, slot, rank, next(_keys))
        self.by_name[name] = adapter
        logger.info("loaded LoRA adapter %s from %s (rank %d, %d layers) into slot %d", name, path, rank,
                    len(weights), slot)
        return adapter

    def unload(self, name: str) -> LoraAdapter:
        adapter = self.by_name.pop(name)
        logger.info("unloaded LoRA adapter %s (slot %d is reused once its requests finish)", name, adapter.slot)
        return adapter

    def _free_slot(self) -> int:
        taken = {adapter.slot for adapter in self.by_name.values()}
        free = [slot for slot in range(self.layers.slots) if slot not in taken]
        idle = [slot for slot in free if not self.in_use(slot)]
        if not idle:
            finishing = f" ({len(free)} more once the requests of unloaded adapters finish)" if free else ""
            raise AdapterError(f"this server holds at most {self.layers.slots} LoRA adapters (--max-loras) and "
                               f"{len(taken)} are loaded{finishing}: unload one first")
        return idle[0]
