"""Server configuration: one dataclass, every field a CLI flag that falls back to an env var."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import socket
import sys
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Literal, Sequence

import torch

EMBEDDED_CHAT_MODEL = "embedded:SmolLM2-135M-Instruct"
DECODER_MODEL_TYPE = "AutoModelForCausalLM"
SEQ2SEQ_MODEL_TYPE = "AutoModelForSeq2SeqLM"
VISION_MODEL_TYPES = ("AutoModelForImageTextToText", "AutoModelForVision2Seq")


class ConfigError(ValueError):
    pass


def parse_bool(text: str | bool) -> bool:
    if isinstance(text, bool):
        return text
    lowered = text.strip().lower()
    if lowered in ("true", "1"):
        return True
    if lowered in ("false", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false/1/0, got {text!r} (a model goes before bare flags)")


AUTO: Literal["auto"] = "auto"


def parse_bool_or_auto(text: str | bool) -> bool | Literal["auto"]:
    """A boolean, or auto: the server decides (what auto means is said by the flag)."""
    if isinstance(text, str) and text.strip().lower() == AUTO:
        return AUTO
    try:
        return parse_bool(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected true/false/1/0 or auto, got {text!r}") from None


def option(flag: str, env: str | None, help: str, default: Any = None, type: Callable = str, choices=None,
           negative: str | None = None, modes: tuple = (), aliases: tuple[str, ...] = (), several: bool = False,
           env_applies: Callable[[str], bool] | None = None) -> Any:
    """A Config field: its flag, env var, help, parser and choices; `negative` names a flag that sets it false (each
    alias gets its own --no- form). `modes`: the values the quality matrix serves it at (the default first; for an
    auto default, the values auto stands for), for a flag that selects how the engine computes
    (tests/unit/test_quality_matrix.py): every flag is either a serving mode or says there why it cannot change a
    model's answers. `aliases`: other spellings of the flag (vLLM's); `several`: the flag takes several values, kept
    comma-separated as the env var gives them; `env_applies`: whether the env var's value is meant for this server
    (False: it is ignored)."""
    return field(default=default, metadata={"flag": flag, "env": env, "help": help, "type": type, "choices": choices,
                                            "negative": negative, "modes": modes, "aliases": aliases,
                                            "several": several, "env_applies": env_applies})


def dtype_name(text: str) -> str:
    """vLLM's spellings of the dtypes too: half is float16, float is float32."""
    lowered = text.strip().lower()
    return {"half": "float16", "float": "float32"}.get(lowered, lowered)


def not_the_machine_name(text: str) -> bool:
    """HOSTNAME is exported by Docker (the container id) and by shells (the machine's name): only an address the
    user chose is one to bind."""
    return text != socket.gethostname()


MEMORY_UNITS = {"": 1, "b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4,
                "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4}


def parse_memory(text: str) -> int | float | None:
    """'auto' -> None; a fraction in (0, 1] of the free memory -> float; '4GiB', '512MB', '1e9' -> bytes."""
    lowered = text.strip().lower()
    if lowered == "auto":
        return None
    number = lowered.rstrip("abcdefghijklmnopqrstuvwxyz").strip()
    unit = lowered[len(number):].strip()
    invalid = ConfigError(f"expected 'auto', a fraction such as 0.5 or a size such as 4GiB, got {text!r}")
    try:
        value = float(number)
    except ValueError:
        raise invalid from None
    if unit not in MEMORY_UNITS or value <= 0:
        raise invalid
    if not unit and value <= 1:
        return value
    return int(value * MEMORY_UNITS[unit])


def parse_max_memory(text: str) -> dict[int | str, int]:
    """'0=20GiB,1=20GiB,cpu=64GiB' -> {0: bytes, 1: bytes, "cpu": bytes}: accelerate's max_memory."""
    limits: dict[int | str, int] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        device, _, size = item.partition("=")
        device = device.strip()
        if not size or not (device.isdigit() or device in ("cpu", "mps")):
            raise ConfigError(f"--max-memory: expected DEVICE=SIZE items (0=20GiB,cpu=64GiB), got {item!r}")
        limit = parse_memory(size)
        if not isinstance(limit, int):
            raise ConfigError(f"--max-memory: {device} needs a size such as 20GiB, got {size!r}")
        limits[int(device) if device.isdigit() else device] = limit
    return limits


NGRAM_KEYS = ("method", "num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min")
DRAFT_MODEL_KEYS = ("method", "num_speculative_tokens", "model")
NGRAM_EXAMPLE = '{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 1}'
DRAFT_MODEL_EXAMPLE = '{"method": "draft_model", "model": "a-smaller-model", "num_speculative_tokens": 4}'


def json_object(text: str, flag: str, example: str) -> dict[str, Any]:
    """A flag's JSON object, or ConfigError saying what was expected."""
    invalid = f"{flag}: expected a JSON object such as {example}"
    try:
        value = json.loads(text)
    except ValueError as error:
        raise ConfigError(f"{invalid}, got {text!r} ({error})") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{invalid}, got {text!r}")
    return value


def parse_speculative_config(text: str) -> dict[str, Any]:
    """vLLM's --speculative-config JSON, checked, with vLLM's defaults: the method is draft_model when a model is
    named; prompt_lookup_min and _max default to each other, or both to 5."""
    spec = json_object(text, "--speculative-config", f"{NGRAM_EXAMPLE} or {DRAFT_MODEL_EXAMPLE}")
    method = spec.setdefault("method", "draft_model" if "model" in spec else None)
    if method not in ("ngram", "draft_model"):
        raise ConfigError(f"--speculative-config: unknown method {method!r}; supported: 'ngram', 'draft_model'")
    known = NGRAM_KEYS if method == "ngram" else DRAFT_MODEL_KEYS
    unknown = sorted(set(spec) - set(known))
    if unknown:
        raise ConfigError(f"--speculative-config: unsupported keys {unknown} for {method}; known: {list(known)}")
    tokens = spec.get("num_speculative_tokens")
    if type(tokens) is not int or tokens < 1:
        raise ConfigError(f"--speculative-config: num_speculative_tokens must be a whole number of at least 1, got "
                          f"{tokens!r}")
    if method == "draft_model":
        if not isinstance(spec.get("model"), str) or not spec["model"]:
            raise ConfigError(f"--speculative-config: draft_model needs the draft's hub id or folder as model, as in "
                              f"{DRAFT_MODEL_EXAMPLE}")
        return spec
    for key in ("prompt_lookup_max", "prompt_lookup_min"):
        value = spec.get(key)
        if value is not None and (type(value) is not int or value < 1):
            raise ConfigError(f"--speculative-config: {key} must be a whole number of at least 1, got {value!r}")
    lookup_min, lookup_max = spec.get("prompt_lookup_min"), spec.get("prompt_lookup_max")
    spec["prompt_lookup_min"] = lookup_min = lookup_min or lookup_max or 5
    spec["prompt_lookup_max"] = lookup_max or lookup_min
    if spec["prompt_lookup_min"] > spec["prompt_lookup_max"]:
        raise ConfigError(f"--speculative-config: prompt_lookup_min ({spec['prompt_lookup_min']}) is more than "
                          f"prompt_lookup_max ({spec['prompt_lookup_max']})")
    return spec


# generation_config.json's sampling fields and the request fields they are defaults of (vLLM's list)
GENERATION_FIELDS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                     "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_tokens"}


def parse_generation_overrides(text: str) -> dict[str, float]:
    """--override-generation-config's JSON object, under the request fields it sets defaults for."""
    overrides = json_object(text, "--override-generation-config", '{"temperature": 0.5, "top_p": 0.9}')
    unknown = sorted(set(overrides) - set(GENERATION_FIELDS))
    if unknown:
        raise ConfigError(f"--override-generation-config: unsupported keys {unknown}; known: {list(GENERATION_FIELDS)}")
    for key, value in overrides.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"--override-generation-config: {key} must be a number, got {value!r}")
    return {GENERATION_FIELDS[key]: value for key, value in overrides.items()}


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # CPU flags of bfloat16 matrix instructions


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return next((set(line.split(":", 1)[1].split()) for line in cpuinfo if line.startswith("flags")), set())
    except OSError:
        return set()


def auto_dtype(device: str, flags: set[str]) -> tuple[str, str]:
    """--torch-dtype auto: the dtype, and why. bfloat16 where the hardware multiplies it natively (CUDA, or a
    CPU with AMX or AVX512-BF16); float32 otherwise, since emulated bfloat16 matmuls are several times slower."""
    if device == "cuda":
        return "bfloat16", "CUDA"
    native = [flag for flag in NATIVE_BF16_FLAGS if flag in flags]
    if native:
        return "bfloat16", f"the CPU has bfloat16 matrix instructions ({', '.join(native)})"
    return "float32", "the CPU has no bfloat16 matrix instructions (amx_bf16, avx512_bf16): bfloat16 would be emulated"


def is_sentence_transformers_folder(model: str) -> bool:
    """An embedding model as sentence-transformers saves one: its modules (pooling, normalisation) in modules.json."""
    return os.path.isfile(os.path.join(model, "modules.json"))


@dataclass
class Config:
    host: str = option("--host", "HOSTNAME", "address to bind (HOSTNAME counts only when it is not just this "
                       "machine's name, which Docker and shells export)", "0.0.0.0", env_applies=not_the_machine_name)
    port: int = option("--port", "PORT", "port to listen on", 7088, int)
    loglevel: str = option("--loglevel", "LOGLEVEL", "logging level (any case)", "INFO", str.upper,
                           choices=["CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG"])
    uvicorn_log_level: str | None = option("--uvicorn-log-level", "UVICORN_LOG_LEVEL", "uvicorn's logging level "
                                           "(any case); unset: --loglevel's", None, str.lower,
                                           choices=["critical", "error", "warning", "info", "debug", "trace"])
    log_format: str = option("--log-format", "LOG_FORMAT", "text: human-readable lines; json: one JSON object per "
                             "line (time, level, logger, message, request fields), for log shippers", "text",
                             choices=["text", "json"])
    model_type: str = option("--model-type", "MODEL_TYPE", "transformers Auto class for the model (with "
                             f"--architecture-type encoder-decoder the default means {SEQ2SEQ_MODEL_TYPE})",
                             DECODER_MODEL_TYPE)
    tokenizer_type: str = option("--tokenizer-type", "TOKENIZER_TYPE", "transformers Auto class for the tokenizer",
                                 "AutoTokenizer")
    tokenizer_use_fast: bool = option("--tokenizer-use-fast", "TOKENIZER_USE_FAST", "use the fast tokenizer",
                                      True, parse_bool)
    processor_type: str = option("--processor-type", "PROCESSOR_TYPE", "transformers Auto class for the processor",
                                 "AutoTokenizer")
    hf_model: str = option("--hf-model", "HF_MODEL",
                           "Hugging Face model id, local folder or .gguf file (also the first positional argument, as "
                           "`vllm serve MODEL`); the default is the built-in model", EMBEDDED_CHAT_MODEL,
                           aliases=("--model",))
    tokenizer: str | None = option("--tokenizer", "BATCHWISE_TOKENIZER", "Hugging Face id or folder of the "
                                   "tokenizer, when it is not the model's (chat models without images)", None)
    revision: str | None = option("--revision", "BATCHWISE_REVISION", "the model's branch, tag or commit on the "
                                  "Hugging Face hub", None)
    trust_remote_code: bool = option("--trust-remote-code", "TRUST_REMOTE_CODE", "run the Python code a hub model "
                                     "ships with its weights (its own model classes)", False, parse_bool)
    download_dir: str | None = option("--download-dir", "BATCHWISE_DOWNLOAD_DIR", "folder for models downloaded "
                                      "from the hub; unset: Hugging Face's cache", None)
    torch_dtype: str = option("--torch-dtype", "TORCH_DTYPE",
                              "model dtype (half: float16, float: float32); auto: bfloat16 on CUDA and on CPUs with "
                              "bfloat16 matrix instructions (AMX, AVX512-BF16), else float32", "auto", dtype_name,
                              choices=["auto", "float32", "bfloat16", "float16"], aliases=("--dtype",))
    architecture_type: str = option("--architecture-type", "ARCHITECTURE_TYPE", "model architecture", "decoder",
                                    choices=["decoder", "encoder-decoder"])
    serving_type: str = option("--serving-type", "SERVING_TYPE", "what the server serves: chat (generation), "
                               "whisper (speech to text) or embedding (/v1/embeddings from an embedding model: the "
                               "built-in all-MiniLM-L6-v2 unless a model is given); a sentence-transformers folder "
                               "(with modules.json) is served as embedding", "chat",
                               choices=["chat", "whisper", "embedding"])
    max_audio_mb: int = option("--max-audio-mb", "MAX_AUDIO_MB", "largest audio upload in MB (whisper serving)",
                               25, int)
    max_image_mb: float = option("--max-image-mb", "MAX_IMAGE_MB", "largest image in a chat message, in MB "
                                 "(vision-language models)", 20.0, float)
    max_image_pixels: int = option("--max-image-pixels", "MAX_IMAGE_PIXELS", "most pixels (width x height) an image "
                                   "may have", 40_000_000, int)
    allow_remote_images: bool = option("--allow-remote-images", "ALLOW_REMOTE_IMAGES", "fetch http(s) image URLs "
                                       "(with --image-fetch-timeout and --max-image-mb)", True, parse_bool)
    image_fetch_timeout: float = option("--image-fetch-timeout", "IMAGE_FETCH_TIMEOUT", "seconds to fetch a remote "
                                        "image", 10.0, float)
    allowed_local_media_path: str | None = option("--allowed-local-media-path", "ALLOWED_LOCAL_MEDIA_PATH",
                                                  "a folder whose image files messages may name (file:// URLs or "
                                                  "paths); unset: none", None)
    whisper_beam_size: int = option("--whisper-beam-size", "WHISPER_BEAM_SIZE",
                                    "beams per 30 s window decoded at temperature 0 (whisper serving; 1 is greedy): "
                                    "each beam is a batch row, all of a window's beams share its encoded audio", 1, int)
    continuous_batching_microsleep: float = option(
        "--continuous-batching-microsleep", "CONTINUOUS_BATCHING_MICROSLEEP",
        "seconds the engine loop sleeps between steps; 0 (default) still yields to the event loop once, and new "
        "requests join while a step runs either way", 0.0, float)
    continuous_batching_batch_size: int = option(
        "--continuous-batching-batch-size", "CONTINUOUS_BATCHING_BATCH_SIZE",
        "most sequences decoded together in one step", 20, int, aliases=("--max-num-seqs",))
    static_cache: bool = option("--static-cache", "STATIC_CACHE",
                                "give every batch row a fixed K/V slot of --static-cache-decoder-max-length tokens and "
                                "decode in one static-shape step (what --torch-compile compiles)", False, parse_bool,
                                modes=(False, True))
    static_cache_encoder_max_length: int = option(
        "--static-cache-encoder-max-length", "STATIC_CACHE_ENCODER_MAX_LENGTH",
        "static cache: longest encoder input (encoder-decoder models)", 256, int)
    static_cache_decoder_max_length: int = option(
        "--static-cache-decoder-max-length", "STATIC_CACHE_DECODER_MAX_LENGTH",
        "static cache: tokens per row's slot (prompt plus completion); a decoder's request that outgrows its slot "
        "runs as a long row in the KV budget beside the slots", 256, int)
    accelerator_type: str = option("--accelerator-type", "ACCELERATOR_TYPE",
                                   "device to run on; unset: cuda when available, else cpu", None,
                                   choices=["cuda", "cpu"])
    device_map: str | None = option("--device-map", "DEVICE_MAP",
                                    "spread the model's layers over the visible GPUs with accelerate (layers that do "
                                    "not fit are kept in CPU memory, slowly); each layer's K/V live where the layer "
                                    "computes; unset: the whole model on one device", None,
                                    choices=["auto", "balanced", "balanced_low_0", "sequential"])
    max_memory: str | None = option("--max-memory", "MAX_MEMORY",
                                    "with --device-map: most memory for weights per device, e.g. 0=20GiB,1=20GiB,"
                                    "cpu=64GiB", None)
    max_concurrent: int = option("--max-concurrent", "MAX_CONCURRENT",
                                 "most requests running plus waiting; beyond it requests get 429", 100, int)
    torch_profiling: bool = option("--torch-profiling", "TORCH_PROFILING",
                                   "profile the first engine steps with torch.profiler: Chrome traces, and a table of "
                                   "the top operators logged at shutdown", False, parse_bool)
    torch_profiling_dir: str = option("--torch-profiling-dir", "TORCH_PROFILING_DIR",
                                      "folder for the profiler's traces and summary", "batchwise-profiles")
    torch_profiling_steps: int = option("--torch-profiling-steps", "TORCH_PROFILING_STEPS",
                                        "how many engine steps to profile", 20, int)
    hqq: bool = option("--hqq", "HQQ", "quantise the linear layers with HQQ (weight-only; not the embeddings or the "
                       "LM head): less memory, and on CUDA int4 matmul kernels", False, parse_bool, modes=(False, True))
    hqq_nbits: int = option("--hqq-nbits", "HQQ_NBITS", "HQQ bits per weight", 4, int, choices=[2, 3, 4, 8])
    hqq_group_size: int = option("--hqq-group-size", "HQQ_GROUP_SIZE", "HQQ weights per scale and zero", 64, int,
                                 choices=[32, 64, 128, 256])
    int8: bool = option("--int8", "INT8", "int8 weights and per-token int8 activations for every linear layer and "
                        "the LM head (W8A8): integer products, on CPU", False, parse_bool, modes=(False, True))
    quantization: str | None = option("--quantization", "QUANTIZATION", "vLLM's spelling: int8 sets --int8, hqq "
                                      "sets --hqq", None, choices=["int8", "hqq"])
    torch_compile: bool | Literal["auto"] = option(
        "--torch-compile", "TORCH_COMPILE",
        "torch.compile the decode step, once per batch bucket at start-up (graphs kept under --model-cache-dir; on "
        "CPU each bucket's whole step is saved, so a later start loads it); auto: on CPU, for a text decoder without "
        "LoRA or a device map, the static step runs compiled where an earlier start saved it and eagerly until "
        "then, while a background process at the lowest priority compiles and saves the missing steps, each taken "
        "up as it is saved; elsewhere auto is false", AUTO, parse_bool_or_auto, modes=(False, True))
    torch_compile_mode: str = option("--torch-compile-mode", "TORCH_COMPILE_MODE",
                                     "torch.compile mode of the decode step (reduce-overhead: CUDA graphs on CUDA)",
                                     "reduce-overhead", choices=["default", "reduce-overhead", "max-autotune",
                                                                 "max-autotune-no-cudagraphs"])
    kv_cache_memory: str = option("--kv-cache-memory", "KV_CACHE_MEMORY",
                                  "KV memory budget, fixed at start-up: a size (4GiB, 512MB), a fraction of the free "
                                  "memory after loading (0.5), or auto (0.25 of free RAM on CPU, 0.6 of free GPU "
                                  "memory on CUDA; never more than the running batch can use)", "auto")
    gpu_memory_utilization: float | None = option(
        "--gpu-memory-utilization", "GPU_MEMORY_UTILIZATION",
        "vLLM's KV budget instead of --kv-cache-memory: the fraction of the GPU's whole memory this server may hold; "
        "the KV cache gets what the loaded weights leave of it (chat models on one GPU)", None, float)
    prefix_caching: bool = option("--prefix-caching", "PREFIX_CACHING",
                                  "reuse the K/V of prompt prefixes already computed", True, parse_bool,
                                  negative="--no-prefix-caching", modes=(True, False),
                                  aliases=("--enable-prefix-caching",))
    max_num_batched_tokens: int | None = option(
        "--max-num-batched-tokens", "MAX_NUM_BATCHED_TOKENS",
        "prompt tokens one step computes while other requests are decoding, so their streams keep flowing "
        "(prompts that finish in the step may add one per free batch row); unset: at most 32 on CPU, 2048 on CUDA, "
        "each chunk sized by measured step time so that a step lasts at most twice the decoding rows' own", None, int,
        modes=(None, 16))
    batch_invariant: bool = option("--batch-invariant", "BATCH_INVARIANT",
                                   "make each request's output independent of what else runs beside it (greedy "
                                   "output reproducible to the bit): prompts are cut at fixed multiples of "
                                   "--max-num-batched-tokens", False, parse_bool, modes=(False, True))
    max_model_len: int | None = option("--max-model-len", "MAX_MODEL_LEN",
                                       "longest prompt plus completion in tokens; unset: the model's context",
                                       None, int)
    served_model_name: str | None = option("--served-model-name", "SERVED_MODEL_NAME",
                                           "name(s) clients use for the model, space- or comma-separated, the first "
                                           "one shown in /health and the logs; unset: the model id", None,
                                           several=True)
    enable_lora: bool = option("--enable-lora", "ENABLE_LORA", "serve LoRA adapters beside the base model (implied by "
                               "--lora-modules): every linear layer gets --max-loras adapter slots", False, parse_bool)
    lora_modules: str | None = option("--lora-modules", "LORA_MODULES", "LoRA adapters served at start-up, as "
                                      "NAME=PATH (PEFT adapter folders), space- or comma-separated; a request picks "
                                      "one by its model field", None, several=True)
    max_loras: int = option("--max-loras", "MAX_LORAS", "most LoRA adapters loaded at once (each a slot every "
                            "forward computes)", 1, int)
    max_lora_rank: int = option("--max-lora-rank", "MAX_LORA_RANK", "largest LoRA rank served (every slot is "
                                "padded to it)", 16, int)
    allow_runtime_lora_updating: bool = option(
        "--allow-runtime-lora-updating", "VLLM_ALLOW_RUNTIME_LORA_UPDATING", "serve POST /v1/load_lora_adapter and "
        "/v1/unload_lora_adapter (behind the API key): clients may then load adapters from the server's disk",
        False, parse_bool)
    max_logprobs: int | None = option("--max-logprobs", "MAX_LOGPROBS", "most alternatives per token a request may "
                                      "ask for (top_logprobs, a completion's logprobs); unset: OpenAI's limits, 20 "
                                      "on chat and 5 on completions", None, int)
    seed: int | None = option("--seed", "BATCHWISE_SEED", "the seed of requests that give none (each such request "
                              "is then sampled alike); unset: a random one per request", None, int)
    api_key: str | None = option("--api-key", "API_KEY",
                                 "require 'Authorization: Bearer <key>' on /v1: one key, a comma-separated list, "
                                 "or a file with one key per line", None)
    request_timeout: float = option("--request-timeout", "REQUEST_TIMEOUT",
                                    "seconds a request may take before it is cancelled (0: no limit)", 600.0, float)
    shutdown_grace: float = option("--shutdown-grace", "SHUTDOWN_GRACE",
                                   "seconds running requests may take to finish after SIGTERM", 30.0, float)
    step_timeout: float = option("--step-timeout", "STEP_TIMEOUT",
                                 "seconds one engine step may run before the engine is declared wedged: /health turns "
                                 "503 and the process exits non-zero, for its supervisor to restart it (0: never)",
                                 300.0, float)
    failpoints: str = option("--failpoints", "BATCHWISE_FAILPOINTS",
                             "chaos testing: comma-separated STAGE:USER:KIND; a step of STAGE (prefill, decode) with a "
                             "row whose request's user is USER does KIND (error, oom, hang) instead of running", "")
    allowed_origins: str = option("--allowed-origins", "ALLOWED_ORIGINS",
                                  "comma-separated origins allowed by CORS, or *; empty: CORS off", "")
    reasoning_parser: str = option("--reasoning-parser", "REASONING_PARSER",
                                   "split <think> reasoning into reasoning_content (auto: when the chat template "
                                   "opens a think block)", "auto", choices=["none", "auto", "deepseek_r1"])
    metrics_public: bool = option("--metrics-public", "METRICS_PUBLIC",
                                  "serve /metrics without the API key (for a Prometheus that has none)", False,
                                  parse_bool)
    responses_store_size: int = option("--responses-store-size", "RESPONSES_STORE_SIZE",
                                       "responses kept for previous_response_id and GET /v1/responses/{id}, least "
                                       "recently used dropped first; in this process only (0: keep none)", 1000, int)
    tool_call_parser: str = option("--tool-call-parser", "TOOL_CALL_PARSER",
                                   "how the model writes tool calls (auto: from the chat template; Hermes when it "
                                   "shows none)", "auto", choices=["auto", "hermes", "llama3_json", "mistral"])
    speculative_config: str | None = option(
        "--speculative-config", "SPECULATIVE_CONFIG",
        f"speculative decoding, as vLLM's JSON: {NGRAM_EXAMPLE} drafts up to num_speculative_tokens tokens by finding "
        "the sequence's last n tokens (n from prompt_lookup_max down to prompt_lookup_min) earlier in its prompt or "
        f"output; {DRAFT_MODEL_EXAMPLE} has a smaller model with the same tokenizer draft them; one forward verifies "
        "them, keeping each request's output distribution; decoder models, not in batch-invariant mode; unset: off",
        None, modes=(None, NGRAM_EXAMPLE))
    chat_template: str | None = option("--chat-template", "CHAT_TEMPLATE",
                                       "the chat template in place of the model's own (or for a model that has "
                                       "none): a Jinja file, or the template's text inline", None)
    generation_config: str = option("--generation-config", "GENERATION_CONFIG",
                                    "where chat and completions requests' sampling defaults come from: auto: the "
                                    "model's generation_config.json (temperature, top_p, top_k, min_p, "
                                    "repetition_penalty; max_new_tokens as the max_tokens of a request that gives "
                                    "none) for the fields a request leaves unset; none (or vllm): OpenAI's defaults; "
                                    "a folder: the generation_config.json in it", "auto")
    override_generation_config: str | None = option("--override-generation-config", "OVERRIDE_GENERATION_CONFIG",
                                                    "sampling defaults over --generation-config's, as JSON: "
                                                    '{"temperature": 0.5, "max_new_tokens": 200}', None)
    enable_auto_tool_choice: bool = option("--enable-auto-tool-choice", "ENABLE_AUTO_TOOL_CHOICE",
                                           "accepted for vLLM's command lines: tools and tool_choice auto are always "
                                           "on here", False, parse_bool)
    model_cache_dir: str = option("--model-cache-dir", "BATCHWISE_CACHE_DIR",
                                  "folder for converted model copies (GGUF to safetensors; one per input content, "
                                  "found again after a reinstall; a start removes copies of its name unused for 7 "
                                  "days) and --torch-compile's compiled graphs",
                                  os.path.join(os.path.expanduser("~"), ".cache", "batchwise"))

    def __post_init__(self) -> None:
        if self.quantization:
            setattr(self, self.quantization, True)
        if self.serving_type == "chat" and is_sentence_transformers_folder(self.hf_model):
            self.serving_type = "embedding"

    def validate(self) -> None:
        if self.accelerator_type == "cuda" and not torch.cuda.is_available():
            raise ConfigError("--accelerator-type cuda was requested but CUDA is not available")
        positive = {
            "--port": self.port, "--continuous-batching-batch-size": self.continuous_batching_batch_size,
            "--max-concurrent": self.max_concurrent, "--max-audio-mb": self.max_audio_mb,
            "--whisper-beam-size": self.whisper_beam_size,
            "--torch-profiling-steps": self.torch_profiling_steps, "--max-image-pixels": self.max_image_pixels,
        }
        if self.max_logprobs is not None and self.max_logprobs < 0:
            raise ConfigError("--max-logprobs must not be negative")
        for flag, value in positive.items():
            if value < 1:
                raise ConfigError(f"{flag} must be at least 1, got {value}")
        fractional = {"--max-image-mb": self.max_image_mb, "--image-fetch-timeout": self.image_fetch_timeout}
        for flag, value in fractional.items():
            if value <= 0:
                raise ConfigError(f"{flag} must be positive, got {value:g}")
        if self.continuous_batching_microsleep < 0:
            raise ConfigError("--continuous-batching-microsleep must not be negative")
        for flag, value in {"--request-timeout": self.request_timeout, "--shutdown-grace": self.shutdown_grace,
                            "--step-timeout": self.step_timeout}.items():
            if value < 0:
                raise ConfigError(f"{flag} must not be negative")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ConfigError("--max-model-len must be at least 2")
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < 16:
            raise ConfigError("--max-num-batched-tokens must be at least 16")
        parse_memory(self.kv_cache_memory)
        if self.speculative_config:
            parse_speculative_config(self.speculative_config)
        self._check_generation_defaults()
        if self.encoder_decoder:
            self._check_encoder_decoder()
        if self.device_map and self.serving_type != "chat":
            raise ConfigError("--device-map spreads a chat model over devices; Whisper models run on one device, as "
                              "do embedding models")
        if self.int8 and self.hqq:
            raise ConfigError("--int8 and --hqq are two quantisations of the same layers: choose one")
        if self.int8 and self.device != "cpu":
            raise ConfigError("--int8 runs torch's CPU int8 products (on CUDA they need 17 rows or more); on a GPU "
                              "use --hqq")
        if self.device_map and self.hqq:
            raise ConfigError("--hqq quantises a model on one device; it cannot be combined with --device-map")
        if self.device_map and self.accelerator_type == "cpu":
            raise ConfigError("--device-map spreads a model over GPUs; with --accelerator-type cpu leave it unset")
        if self.max_memory and not self.device_map:
            raise ConfigError("--max-memory limits what --device-map places on each device: give --device-map too")
        if self.tokenizer and (self.vision or self.serving_type == "whisper"):
            raise ConfigError("--tokenizer replaces a chat model's tokenizer; vision-language and Whisper models "
                              "take theirs from their processor")
        if self.gpu_memory_utilization is not None:
            self._check_gpu_memory_utilization()
        if self.lora:
            self._check_lora()
        self.weight_memory()

    def _check_generation_defaults(self) -> None:
        if self.serving_type == "whisper" and (self.chat_template or self.override_generation_config):
            raise ConfigError("--chat-template and --override-generation-config shape chat requests; a Whisper "
                              "server's prompts are audio")
        self.chat_template_text()
        self.generation_overrides()
        source = self.generation_config
        if source not in ("auto", "none", "vllm") and not os.path.isfile(os.path.join(source,
                                                                                        "generation_config.json")):
            raise ConfigError(f"--generation-config is auto, none, or a folder with a generation_config.json; "
                              f"{source!r} is none of these")

    def chat_template_text(self) -> str | None:
        """--chat-template's Jinja text: a file's content, or the flag's value when it is a template itself."""
        value = self.chat_template
        if value is None or "{{" in value or "{%" in value:
            return value
        try:
            with open(value, encoding="utf-8") as file:
                return file.read()
        except OSError as error:
            raise ConfigError(f"--chat-template is neither a readable file nor a Jinja template: {error}") from None

    def generation_overrides(self) -> dict[str, float]:
        return parse_generation_overrides(self.override_generation_config) if self.override_generation_config else {}

    def _check_gpu_memory_utilization(self) -> None:
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ConfigError(f"--gpu-memory-utilization is a fraction in (0, 1], got {self.gpu_memory_utilization:g}")
        if self.kv_cache_memory.strip().lower() != "auto":
            raise ConfigError("--gpu-memory-utilization and --kv-cache-memory both size the KV cache: give one")
        if self.device != "cuda":
            raise ConfigError("--gpu-memory-utilization sizes the KV cache from a GPU's memory; on the CPU give "
                              "--kv-cache-memory")
        if self.device_map or self.serving_type == "whisper":
            raise ConfigError("--gpu-memory-utilization sizes a chat model's KV cache on one GPU; with --device-map "
                              "give --kv-cache-memory (Whisper models keep no KV budget)")

    @property
    def lora(self) -> bool:
        """LoRA adapters are served (--enable-lora, or adapters given at start-up)."""
        return self.enable_lora or bool(self.lora_modules)

    def lora_adapters(self) -> list[tuple[str, str]]:
        """--lora-modules as (name, path) pairs."""
        pairs = []
        for item in filter(None, (part.strip() for part in (self.lora_modules or "").split(","))):
            name, _, path = item.partition("=")
            if not name.strip() or not path.strip():
                raise ConfigError(f"--lora-modules: expected NAME=PATH items, got {item!r}")
            pairs.append((name.strip(), path.strip()))
        return pairs

    def _check_lora(self) -> None:
        for flag, value in {"--max-loras": self.max_loras, "--max-lora-rank": self.max_lora_rank}.items():
            if value < 1:
                raise ConfigError(f"{flag} must be at least 1, got {value}")
        if self.serving_type != "chat" or self.encoder_decoder or self.vision:
            raise ConfigError("LoRA adapters are served for text decoder models; not for encoder-decoder, "
                              "vision-language or Whisper models")
        names = [name for name, _ in self.lora_adapters()]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ConfigError(f"--lora-modules names {', '.join(duplicates)} more than once")
        if len(names) > self.max_loras:
            raise ConfigError(f"--lora-modules gives {len(names)} adapters, more than --max-loras {self.max_loras}")

    def sized_after_loading(self) -> Config:
        """The configuration an engine is built with once the weights are loaded: --gpu-memory-utilization as a KV
        budget in bytes. vLLM's meaning: this process may hold that fraction of the GPU's whole memory, and what
        its weights and buffers hold already comes out of it; unlike vLLM, the step's activations are not measured
        first, so they come out of the rest of the GPU's memory."""
        if self.gpu_memory_utilization is None:
            return self
        free, total = torch.cuda.mem_get_info()
        budget = int(self.gpu_memory_utilization * total) - torch.cuda.memory_reserved()
        if budget <= 0:
            raise ConfigError(f"--gpu-memory-utilization {self.gpu_memory_utilization:g} allows "
                              f"{self.gpu_memory_utilization * total / 2**30:.1f} GiB, which the loaded model already "
                              "holds: raise it")
        if budget > free:
            raise ConfigError(f"--gpu-memory-utilization {self.gpu_memory_utilization:g} leaves a KV cache of "
                              f"{budget / 2**30:.1f} GiB, but only {free / 2**30:.1f} GiB of the GPU are free (other "
                              "processes hold the rest): lower it")
        return dataclasses.replace(self, kv_cache_memory=str(budget), gpu_memory_utilization=None)

    def hub_options(self) -> dict[str, Any]:
        """from_pretrained's keywords for where a model's files come from: only those given, so that without them
        loading is what transformers does by default."""
        options = {"revision": self.revision, "cache_dir": self.download_dir,
                   "trust_remote_code": self.trust_remote_code or None}
        return {name: value for name, value in options.items() if value is not None}

    def served_names(self, model_name: str) -> tuple[str, ...]:
        """The names clients may use for the model: --served-model-name's list, else the model's own name."""
        names = [n.strip() for n in (self.served_model_name or "").split(",") if n.strip()]
        return tuple(names) or (model_name,)

    def weight_memory(self) -> dict[int | str, int] | None:
        """--max-memory as accelerate's max_memory, or None (accelerate's own estimate of each device)."""
        return parse_max_memory(self.max_memory) if self.max_memory else None

    @property
    def origins(self) -> list[str]:
        return [o.strip() for o in self.allowed_origins.split(",") if o.strip()]

    def api_keys(self) -> list[str]:
        """Keys from --api-key: a file of keys (one per line) when it names a file, else a comma-separated list."""
        if not self.api_key:
            return []
        if os.path.isfile(self.api_key):
            with open(self.api_key) as keys:
                return [line.strip() for line in keys if line.strip() and not line.startswith("#")]
        return [key.strip() for key in self.api_key.split(",") if key.strip()]

    @property
    def encoder_decoder(self) -> bool:
        """A text encoder-decoder model (T5, BART) is served."""
        return self.serving_type == "chat" and (self.architecture_type == "encoder-decoder"
                                                or self.model_type == SEQ2SEQ_MODEL_TYPE)

    @property
    def model_class(self) -> str:
        """The transformers Auto class to load with: --model-type, or the Seq2Seq class its default stands for
        under --architecture-type encoder-decoder."""
        if self.encoder_decoder and self.model_type == DECODER_MODEL_TYPE:
            return SEQ2SEQ_MODEL_TYPE
        return self.model_type

    @property
    def vision(self) -> bool:
        """A vision-language chat model is served (images in messages)."""
        return self.serving_type == "chat" and self.model_type in VISION_MODEL_TYPES

    def _check_encoder_decoder(self) -> None:
        if self.hf_model == EMBEDDED_CHAT_MODEL:
            raise ConfigError("encoder-decoder serving needs --hf-model (a T5 or BART folder or hub id): the "
                              "embedded model is a decoder model")
        if self.device_map:
            raise ConfigError("--device-map serves decoder models; encoder-decoder models do not take it yet")

    @property
    def device(self) -> str:
        return self.accelerator_type or default_device()

    @property
    def dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype_choice()[0])

    def dtype_choice(self) -> tuple[str, str]:
        """The model's dtype name, and why it was chosen."""
        if self.torch_dtype != "auto":
            return self.torch_dtype, "--torch-dtype"
        return auto_dtype(self.device, cpu_flags())


POSITIONAL_MODEL = "model"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="main.py", description="Batchwise: an OpenAI-compatible server for Hugging Face models. Boolean flags "
        "take true/false/1/0, or nothing for true.", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument(POSITIONAL_MODEL, nargs="?", default=None, help="the model, as --hf-model (vLLM's `vllm "
                        "serve MODEL`)")
    for f in fields(Config):
        meta = f.metadata
        boolean = meta["type"] in (parse_bool, parse_bool_or_auto)  # given bare (--int8), as vLLM's are, it means true
        parser.add_argument(meta["flag"], *meta["aliases"], dest=f.name, type=meta["type"], default=f.default,
                            choices=meta["choices"], nargs="+" if meta["several"] else "?" if boolean else None,
                            const=True if boolean else None, help=f"{meta['help']} [env {meta['env']}]")
        if meta["negative"]:
            negatives = [meta["negative"], *(f"--no-{alias.removeprefix('--')}" for alias in meta["aliases"])]
            parser.add_argument(*negatives, dest=f.name, action="store_false", help=f"set {meta['flag']} false")
    return parser


def env_default(f) -> Any:
    text = os.environ.get(f.metadata["env"], "")
    applies = f.metadata["env_applies"]
    if text == "" or (applies and not applies(text)):
        return f.default
    try:
        return f.metadata["type"](text)
    except (ValueError, argparse.ArgumentTypeError) as error:
        raise ConfigError(f"environment variable {f.metadata['env']}={text!r} is invalid: {error}") from None


def command_line_values(parser: argparse.ArgumentParser, argv: Sequence[str]) -> dict[str, Any]:
    """The parsed flags by field: several values joined by commas, a positional model as --hf-model."""
    values = vars(parser.parse_args(argv))
    for f in fields(Config):
        if f.metadata["several"] and isinstance(values[f.name], list):
            values[f.name] = ",".join(values[f.name])
    model = values.pop(POSITIONAL_MODEL)
    if model is not None:
        if values["hf_model"] not in (parser.get_default("hf_model"), model):
            raise ConfigError(f"the model is given twice ({model} and --hf-model/--model {values['hf_model']}): "
                              "give it once")
        values["hf_model"] = model
    return values


def parse_config(argv: Sequence[str] | None = None) -> Config:
    parser = build_parser()
    try:
        parser.set_defaults(**{f.name: env_default(f) for f in fields(Config)})
        config = Config(**command_line_values(parser, sys.argv[1:] if argv is None else argv))
        config.validate()
    except ConfigError as error:
        parser.error(str(error))
    return config
