"""Compiled steps saved to disk, so that a later start loads each bucket's graph instead of tracing the model again
(dynamo's precompile: torch.compile(...).aot_compile, save_compiled_function, load_compiled_function). Inductor's
own caches keep the kernels across starts, but dynamo traces the model at every start: most of a later
--torch-compile start (8-10 s a bucket for the embedded model on 2 AVX2 cores; a saved one loads in 0.1-1 s).

A saved step runs without dynamo's guards, so its file is named by a key of everything its graph was traced from
and may hold as a constant: the machine (torch, transformers and Python versions, the CPU's features, the thread
count), the compile options, every module of the forward (its class and attributes, the models' configs, each
tensor's name, shape, dtype and device) and the bucket; a forward holding an object the key cannot describe (an
encoder-decoder's family, LoRA's adapter rows) is not saved. The weights are inputs of the graph, read at each
call, not part of it. The code dynamo traced (ours and transformers') is checked at load against the checksums
dynamo recorded; a saved step that fails at its first call (a kernel library missing now) is not used.

A step that cannot be saved (a graph break, an object dynamo cannot serialise) is compiled at each start as
before; a file that no longer loads (torch's format, changed code) is compiled again and replaced. The folder of
one key is marked used at each start (model_manager removes folders of keys unused for a week)."""

from __future__ import annotations

import enum
import hashlib
import importlib
import inspect
import logging
import os
import platform
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import transformers

logger = logging.getLogger("batchwise.compile")

FOLDER_NAME = "step"  # the steps of one key lie in <folder>/step-<key>
FORMAT = 1  # of the key: raise it when what a saved step depends on changes in a way the key does not see

Step = Callable[..., Any]


def saved_or_compiled(forward: torch.nn.Module, options: dict[str, Any], folder: Path, compiled: Step) -> Step:
    """`compiled` (the forward compiled at each start) where the forward holds what a key cannot describe; else
    SavedSteps keeping its steps in a folder of their key under `folder`."""
    try:
        key = forward_key(forward, options)
    except Undescribed as error:
        logger.info("the %s is compiled at each start, not saved: the key of a saved step cannot describe the %s it "
                    "holds", type(forward).__name__, error)
        return compiled
    keyed = folder / f"{FOLDER_NAME}-{key}"
    keyed.mkdir(parents=True, exist_ok=True)
    os.utime(keyed)  # used now (model_manager removes folders a week unused)
    return SavedSteps(forward, options, keyed, compiled)


class SavedSteps:
    """The forward compiled once per bucket (its inputs' row count), each bucket's graph loaded from `folder` or
    compiled and saved there; `fallback` (the forward compiled at each start) serves a bucket that cannot be
    saved."""

    def __init__(self, forward: torch.nn.Module, options: dict[str, Any], folder: Path, fallback: Step) -> None:
        self.forward = forward
        self.options = {**options, "guard_filter_fn": no_guards}
        self.folder = folder
        self.fallback = fallback
        self.steps: dict[int, Step] = {}

    def __call__(self, *inputs: torch.Tensor) -> Any:
        rows = len(inputs[0])
        if rows in self.steps:
            return self.steps[rows](*inputs)
        step = self._load(rows) or self._compile(inputs)
        try:
            output = step(*inputs)
        except Exception as error:  # noqa: BLE001 - a saved step that cannot run here is not used
            if step is self.fallback:
                raise
            logger.warning("the saved step for %d rows failed (%s): compiling it at each start", rows,
                           first_line(error))
            step = self.fallback
            output = step(*inputs)
        self.steps[rows] = step
        return output

    def _path(self, rows: int) -> Path:
        return self.folder / f"rows-{rows}.pt2"

    def _load(self, rows: int) -> Step | None:
        if not self._path(rows).is_file():
            return None
        try:
            return partial(load_step(self._path(rows)), self.forward)
        except Exception as error:  # noqa: BLE001 - a file that no longer loads is compiled again
            logger.warning("compiling %s again: it does not load (%s)", self._path(rows), first_line(error))
            return None

    def _compile(self, inputs: tuple[torch.Tensor, ...]) -> Step:
        rows = len(inputs[0])
        try:
            # options of its own: torch.compile takes guard_filter_fn out of the dict it is given
            step = torch.compile(type(self.forward).forward, fullgraph=True, dynamic=False,
                                 options={**self.options}).aot_compile(((self.forward, *inputs), {}))
        except Exception as error:  # noqa: BLE001 - what dynamo cannot save is compiled as at every start
            logger.info("the step for %d rows is compiled at each start: it cannot be saved (%s)", rows,
                        first_line(error))
            return self.fallback
        step.disable_guard_check()
        try:
            step.save_compiled_function(str(self._path(rows)))
        except Exception as error:  # noqa: BLE001 - it still serves this start
            logger.warning("could not save the step for %d rows in %s (%s)", rows, self._path(rows),
                           first_line(error))
        return partial(step, self.forward)


def no_guards(entries: list[Any]) -> list[bool]:
    """Dynamo's guards tell graphs apart by their inputs; SavedSteps picks the graph by the bucket itself, and most
    guards (on modules, globals, classes) cannot be saved."""
    return [False] * len(entries)


def load_step(path: Path) -> Step:
    started = time.perf_counter()
    with path.open("rb") as file:
        step = torch.compiler.load_compiled_function(file)
    changed = changed_sources(step.source_info().inlined_sources)
    if changed:
        raise RuntimeError(f"the code it traced has changed: {', '.join(changed)}")
    step.disable_guard_check()
    logger.info("loaded %s in %.1f s", path, time.perf_counter() - started)
    return step


def changed_sources(sources: set[Any]) -> list[str]:
    """Where the code dynamo traced (its modules' line ranges, with the checksums it recorded) reads differently
    now."""
    changed = []
    for source in sources:
        lines = inspect.getsourcelines(importlib.import_module(source.module))[0]
        text = "".join(lines[source.firstlineno - 1:source.lastlineno - 1])
        if hashlib.sha256(text.encode()).hexdigest() != source.checksum:
            changed.append(f"{source.module} line {source.firstlineno}")
    return sorted(changed)


def forward_key(forward: torch.nn.Module, options: dict[str, Any]) -> str:
    digest = hashlib.sha256()
    for part in (FORMAT, torch.__version__, transformers.__version__, sys.version, platform.machine(), cpu_features(),
                 torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(),
                 torch.get_float32_matmul_precision(),
                 sorted((name, value) for name, value in options.items() if not callable(value)),
                 *module_description(forward)):
        digest.update(repr(part).encode())
    return digest.hexdigest()[:12]


def cpu_features() -> str:
    """The CPU's feature flags: inductor's kernels use the instructions of the CPU they were compiled on (and its
    thread count, also in the key), so a cache shared by other machines is never loaded there."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return next((line for line in cpuinfo if line.startswith("flags")), platform.processor())
    except OSError:
        return platform.processor()


def module_description(root: torch.nn.Module) -> Iterator[object]:
    """What a graph traced through `root` may hold as constants: each module's class and attributes (sizes, flags,
    epsilons, scales, configs, functions), each tensor's name, shape, dtype, device and layout. Raises Undescribed
    for an attribute it cannot describe (an object of our own holding a model, say): such a step is not saved."""
    for name, module in root.named_modules(remove_duplicate=False):
        yield name, type(module).__module__, type(module).__qualname__
        yield sorted((key, describe(value)) for key, value in vars(module).items()
                     if not key.startswith("_") and not isinstance(value, (torch.nn.Module, torch.Tensor)))
    for name, tensor in [*root.named_parameters(remove_duplicate=False), *root.named_buffers(remove_duplicate=False)]:
        yield name, describe(tensor), tensor.requires_grad


class Undescribed(TypeError):
    pass


def describe(value: object) -> object:
    if value is None or isinstance(value, (bool, int, float, str, torch.dtype, torch.device, enum.Enum)):
        return value
    if isinstance(value, (tuple, list)):
        return type(value).__name__, [describe(item) for item in value]
    if isinstance(value, (set, frozenset)):  # in an order of their own: a set's order changes between processes
        return type(value).__name__, sorted(repr(describe(item)) for item in value)
    if isinstance(value, dict):
        return sorted((repr(key), describe(item)) for key, item in value.items())
    if isinstance(value, torch.Tensor):
        return tuple(value.shape), value.dtype, value.device, value.layout
    if isinstance(value, (transformers.PretrainedConfig, transformers.GenerationConfig)):
        return value.to_json_string()
    if isinstance(value, torch.nn.Module):
        return type(value).__qualname__
    if callable(value) and hasattr(value, "__qualname__"):
        return getattr(value, "__module__", None), value.__qualname__
    raise Undescribed(type(value).__qualname__)


def first_line(error: BaseException) -> str:
    return f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
