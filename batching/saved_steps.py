"""Compiled steps saved to disk, so that a later start loads each bucket's graph instead of tracing the model again
(dynamo's precompile: torch.compile(...).aot_compile, save_compiled_function, load_compiled_function). Inductor's
own caches keep the kernels across starts, but dynamo traces the model at every start: most of a later
--torch-compile start (8-10 s a bucket for the embedded model on 2 AVX2 cores; a saved one loads in 0.1-1 s).

A saved step runs without dynamo's guards, so its file is named by a key of everything its graph was traced from
and may hold as a constant: the machine (torch, transformers and Python versions, the CPU's features and vector
ISA, the thread count), dynamo's and inductor's settings and the compile options, whether the attention kernel
built, every module of the forward (its class and attributes, the models' configs, each tensor's name, shape,
strides, dtype and device) and the bucket. A forward holding what the key cannot describe (an encoder-decoder's
family holding the model, LoRA's adapter rows, hooks, frozen weights) is not saved. The weights are inputs of the
graph, read at each call, not part of it. Dynamo keeps the text of each module whose code it traced (ours and
transformers'): a module that reads differently at load has its steps compiled again.

A step that cannot be saved (a graph break, an object dynamo cannot serialise) is compiled at each start as
before; a file that no longer loads (torch's format, changed code) is compiled again and replaced; a step is saved
only once it has run, and a saved one that fails at its first call (a kernel library missing now) is not used.
With --torch-compile auto the server compiles nothing itself: a process beside it
(model_manager.start_background_compile) compiles and saves the steps, and the server takes each one up as its file
appears (renamed into place whole); one that does not load or run here waits for its file to be replaced.
The folder of one key is marked used at each start (model_manager removes folders of keys unused for a week)."""

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
from typing import Any, Callable, Iterable, Iterator

import torch
import transformers
from torch._dynamo.package import InlinedSource
from torch._inductor import cpu_vec_isa

from kernels import decode_attention

logger = logging.getLogger("batchwise.compile")

FOLDER_NAME = "step"  # the steps of one key lie in <folder>/step-<key>
FORMAT = 1  # of the key: raise it when what a saved step depends on changes in a way the key does not see

Step = Callable[..., Any]


def saved_or_compiled(forward: torch.nn.Module, options: dict[str, Any], folder: Path, fallback: Step,
                      compile_missing: bool = True) -> Step:
    """`fallback` where the forward holds what a key cannot describe; else SavedSteps keeping its steps in a folder
    of their key under `folder`. `fallback`: the forward compiled at each start, or with compile_missing false (a
    step another process compiles and saves) the eager forward."""
    try:
        key = forward_key(forward, options)
    except Undescribed as error:
        logger.info("the %s is %s, not saved: the key of a saved step cannot describe %s", type(forward).__name__,
                    "compiled at each start" if compile_missing else "run eagerly", error)
        return fallback
    keyed = folder / f"{FOLDER_NAME}-{key}"
    try:
        keyed.mkdir(parents=True, exist_ok=True)
        os.utime(keyed)  # used now (model_manager removes folders a week unused)
    except OSError as error:  # a read-only cache, or a folder another start removed just now
        logger.warning("the %s is not saved: %s", type(forward).__name__, error)
        return fallback
    return SavedSteps(forward, options, keyed, fallback, compile_missing)


class SavedSteps:
    """The forward compiled once per bucket (its inputs' row count), each bucket's graph loaded from `folder` or
    compiled and saved there; `fallback` serves a bucket that cannot be saved. With compile_missing false nothing
    is compiled here: a bucket runs `fallback` (the eager forward) until its step is saved (by another process),
    and the saved step from the step after; a saved step that does not load or run here counts as not saved until
    its file changes (another process compiles it again and replaces it)."""

    def __init__(self, forward: torch.nn.Module, options: dict[str, Any], folder: Path, fallback: Step,
                 compile_missing: bool = True) -> None:
        self.forward = forward
        self.options = {**options, "guard_filter_fn": no_guards}
        self.folder = folder
        self.fallback = fallback
        self.compile_missing = compile_missing
        self.steps: dict[int, Step] = {}
        self.unusable: dict[int, int] = {}  # bucket -> modification time of its file that did not load or run

    def __call__(self, *inputs: torch.Tensor) -> Any:
        rows = len(inputs[0])
        if rows in self.steps:
            return self.steps[rows](*inputs)
        if not self.compile_missing:
            return self._saved_or_eager(rows, inputs)
        loaded = self._load(rows)
        compiled = None if loaded else self._compile(inputs)
        step = loaded or (partial(compiled, self.forward) if compiled else self.fallback)
        try:
            output = step(*inputs)
        except Exception as error:  # noqa: BLE001 - a saved step that cannot run here is not used
            if step is self.fallback:
                raise
            logger.warning("the saved step for %d rows failed (%s): not used", rows, first_line(error))
            step = self.fallback
            output = step(*inputs)
        if compiled is not None and step is not self.fallback:
            self._save(compiled, rows)  # once it has run: a step that fails is never saved
        self.steps[rows] = step
        return output

    def saved(self, rows: int) -> bool:
        """Whether the bucket's step is on disk, and not a file already found unusable here."""
        modified = self._modified(rows)
        return modified is not None and self.unusable.get(rows) != modified

    def _saved_or_eager(self, rows: int, inputs: tuple[torch.Tensor, ...]) -> Any:
        """The bucket's saved step where it loads and runs (kept from then on), else the eager forward."""
        modified = self._modified(rows)
        if modified is None or self.unusable.get(rows) == modified:
            return self.fallback(*inputs)
        step = self._load(rows)
        try:
            output = step(*inputs) if step else None
        except Exception as error:  # noqa: BLE001 - a saved step that cannot run here is not used
            logger.warning("the saved step for %d rows failed (%s): not used", rows, first_line(error))
            step = None
        if step is None:
            self.unusable[rows] = modified
            return self.fallback(*inputs)
        self.steps[rows] = step
        return output

    def _modified(self, rows: int) -> int | None:
        try:
            return self._path(rows).stat().st_mtime_ns
        except FileNotFoundError:
            return None

    def _path(self, rows: int) -> Path:
        return self.folder / f"rows-{rows}.pt2"

    def _load(self, rows: int) -> Step | None:
        if not self._path(rows).is_file():
            return None
        try:
            return partial(load_step(self._path(rows)), self.forward)
        except Exception as error:  # noqa: BLE001 - a file that no longer loads is not used (compiled again)
            logger.warning("%s does not load (%s): not used", self._path(rows), first_line(error))
            return None

    def _compile(self, inputs: tuple[torch.Tensor, ...]) -> Any:
        """The step for these inputs' bucket compiled to be saved, or None where dynamo cannot save it."""
        try:
            # options of its own: torch.compile takes guard_filter_fn out of the dict it is given
            step = torch.compile(type(self.forward).forward, fullgraph=True, dynamic=False,
                                 options={**self.options}).aot_compile(((self.forward, *inputs), {}))
        except Exception as error:  # noqa: BLE001 - what dynamo cannot save is compiled as at every start
            logger.info("the step for %d rows is compiled at each start: it cannot be saved (%s)", len(inputs[0]),
                        first_line(error))
            return None
        step.disable_guard_check()
        return step

    def _save(self, step: Any, rows: int) -> None:
        """Written whole, then renamed: a server taking steps up as they are saved never reads half a file."""
        written = self._path(rows).with_suffix(f".{os.getpid()}.partial")
        try:
            step.save_compiled_function(str(written))
            os.replace(written, self._path(rows))
        except Exception as error:  # noqa: BLE001 - it still serves this start
            written.unlink(missing_ok=True)
            logger.warning("could not save the step for %d rows in %s (%s)", rows, self._path(rows),
                           first_line(error))


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


def changed_sources(sources: Iterable[InlinedSource]) -> list[str]:
    """The modules whose code dynamo traced (it keeps each one's whole text) that read differently now: a changed
    constant beside a traced function counts too."""
    return sorted({source.module for source in sources
                   if inspect.getsource(importlib.import_module(source.module)) != source.content})


def forward_key(forward: torch.nn.Module, options: dict[str, Any]) -> str:
    if torch._inductor.config.freezing:
        raise Undescribed("frozen weights (TORCHINDUCTOR_FREEZING): they would be constants of the graph")
    digest = hashlib.sha256()
    for part in (FORMAT, torch.__version__, transformers.__version__, sys.version, platform.machine(), cpu_features(),
                 str(cpu_vec_isa.pick_vec_isa()), torch.backends.cpu.get_cpu_capability(), torch.get_num_threads(),
                 torch.are_deterministic_algorithms_enabled(), torch.get_float32_matmul_precision(),
                 decode_attention.built(), compiler_settings(),
                 sorted((name, value) for name, value in options.items() if not callable(value)),
                 *module_description(forward)):
        digest.update(repr(part).encode())
    return digest.hexdigest()[:12]


def compiler_settings() -> list[object]:
    """Dynamo's and inductor's global settings (theirs and the TORCHINDUCTOR_ variables'), sets in a fixed order."""
    return [sorted((name, describe(value) if isinstance(value, (set, frozenset)) else value)
                   for name, value in config.save_config_portable().items())
            for config in (torch._dynamo.config, torch._inductor.config)]


def cpu_features() -> str:
    """The CPU's feature flags: inductor's kernels use the instructions of the CPU they were compiled on (and its
    thread count, also in the key), so a cache shared by other machines is never loaded there."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:  # x86's "flags", ARM's "Features"
            return next((line for line in cpuinfo if line.startswith(("flags", "Features"))), platform.processor())
    except OSError:
        return platform.processor()


def module_description(root: torch.nn.Module) -> Iterator[object]:
    """What a graph traced through `root` may hold as constants: each module's class and attributes (sizes, flags,
    epsilons, scales, configs, functions), each tensor's name, shape, strides, dtype, device and layout. Raises
    Undescribed for what it cannot describe (an object of our own holding a model, say, or a hook): such a step is
    not saved."""
    modules = dict(root.named_modules(remove_duplicate=False))
    if any(hooks for hooks in (torch.nn.modules.module._global_forward_hooks,
                               torch.nn.modules.module._global_forward_pre_hooks)):
        raise Undescribed("global forward hooks")
    for name, module in modules.items():
        if module._forward_hooks or module._forward_pre_hooks:
            raise Undescribed(f"the forward hooks of {name or 'the step'}")
        yield name, type(module).__module__, type(module).__qualname__
        yield sorted((key, describe(value, modules)) for key, value in vars(module).items()
                     if not key.startswith("_") and not isinstance(value, torch.nn.Module))
    for name, tensor in [*root.named_parameters(remove_duplicate=False), *root.named_buffers(remove_duplicate=False)]:
        yield name, describe(tensor), tensor.requires_grad


class Undescribed(TypeError):
    pass


def describe(value: object, modules: dict[str, torch.nn.Module] | None = None) -> object:
    """A plain value standing for `value` in a key; `modules`: the modules that are described on their own."""
    if value is None or isinstance(value, (bool, int, float, str, torch.dtype, torch.device, enum.Enum)):
        return value
    if isinstance(value, (tuple, list)):
        return type(value).__name__, [describe(item, modules) for item in value]
    if isinstance(value, (set, frozenset)):  # in an order of their own: a set's order changes between processes
        return type(value).__name__, sorted(repr(describe(item, modules)) for item in value)
    if isinstance(value, dict):
        return sorted((repr(key), describe(item, modules)) for key, item in value.items())
    if isinstance(value, torch.Tensor):
        return (type(value).__qualname__, tuple(value.shape), value.stride() if value.layout == torch.strided else None,
                value.dtype, value.device, value.layout)
    if isinstance(value, (transformers.PretrainedConfig, transformers.GenerationConfig)):
        return value.to_json_string()
    if isinstance(value, torch.nn.Module):
        name = next((name for name, module in (modules or {}).items() if module is value), None)
        if name is None:
            raise Undescribed(f"a {type(value).__qualname__} outside the step's modules")
        return "module", name
    key_attributes = getattr(type(value), "saved_step_key", None)  # an object of ours names what describes it
    if key_attributes is not None:
        return type(value).__qualname__, [describe(getattr(value, name), modules) for name in key_attributes]
    if callable(value) and hasattr(value, "__qualname__"):
        return getattr(value, "__module__", None), value.__qualname__
    raise Undescribed(f"the {type(value).__qualname__} it holds")


def first_line(error: BaseException) -> str:
    return f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
