"""The quality matrix: every family the server serves (a tiny random checkpoint of each, read by the server's own
loaders), in every dtype the machine runs, under each serving mode config.py declares alone and under combinations
that put every value of every mode beside every value of every other mode at least once. In each, four requests
of different lengths are served together by the engine the server builds (one joins when another has finished,
its prompt starting with that one's and the rest cut into chunks beside the decoding rows): every token served
must be the token transformers' own forward chooses after the same tokens, and carry its log-probability, within
the dtype's bound (tests/helpers/quality.py); in batch-invariant mode each request served alone must give the
same tokens and log-probabilities to the bit. A combination the server cannot serve is refused at start-up,
with the reason."""

from __future__ import annotations

import functools
from dataclasses import fields
from pathlib import Path
from typing import Iterator

import pytest

from config import Config, build_parser, default_device, parse_config
from tests.helpers.engine import run_with_engine
from tests.helpers.quality import (SERVED_FAMILIES, Family, bound, covering_rows, divergence, families,
                                   matrix_dtypes, pairs, refusal, row_name, serve_alone, serve_together, serving_modes)

DEVICE = default_device()
MODES = serving_modes()
DEFAULTS = {name: values[0] for name, values in MODES.items()}
FAMILIES = families()

# Every other flag, and why it cannot change what a model answers (or where else that is tested).
NOT_MODES = {
    **dict.fromkeys(["hf_model", "model_type", "architecture_type", "serving_type", "tokenizer_type",
                     "tokenizer_use_fast", "processor_type", "tokenizer", "revision", "trust_remote_code",
                     "download_dir"], "selects the model and its family: the matrix's rows"),
    "quantization": "vLLM's spelling of --int8 and --hqq, which are modes",
    **dict.fromkeys(["seed", "max_logprobs"], "a default and a limit of requests' fields: greedy requests are "
                    "served alike whatever the seed"),
    "enable_auto_tool_choice": "accepted and ignored: tools are always on",
    **dict.fromkeys(["chat_template", "generation_config", "override_generation_config"], "the prompt a chat renders "
                    "and the defaults of fields a request leaves unset: the matrix gives the engine token ids and "
                    "every sampling field (tests/e2e/test_chat_template.py)"),
    "torch_dtype": "the matrix's dtypes",
    **dict.fromkeys(["enable_lora", "lora_modules", "max_loras", "max_lora_rank", "allow_runtime_lora_updating"],
                    "LoRA adapters, against peft in tests/unit/test_lora.py (the base model's rows unchanged)"),
    "accelerator_type": "the device: the matrix runs on the device the machine has",
    **dict.fromkeys(["device_map", "max_memory"], "spreads layers over GPUs, each computing as on one "
                    "(tests/unit/test_device_map.py)"),
    **dict.fromkeys(["hqq_nbits", "hqq_group_size"], "how --hqq quantises: the reference quantises alike"),
    "torch_compile_mode": "which inductor options compile the same graph (CUDA graphs, autotuning)",
    "whisper_beam_size": "beam search, against transformers' generate(num_beams) in tests/unit/test_whisper.py",
    **dict.fromkeys(["continuous_batching_batch_size", "continuous_batching_microsleep", "max_concurrent",
                     "kv_cache_memory", "gpu_memory_utilization", "max_model_len", "static_cache_encoder_max_length",
                     "static_cache_decoder_max_length", "request_timeout", "shutdown_grace", "step_timeout"],
                    "what fits and when: limits, refused with their numbers when exceeded"),
    **dict.fromkeys(["max_audio_mb", "max_image_mb", "max_image_pixels", "allow_remote_images",
                     "image_fetch_timeout", "allowed_local_media_path"], "which uploads are accepted"),
    **dict.fromkeys(["reasoning_parser", "tool_call_parser"], "reads the text after it is generated"),
    **dict.fromkeys(["host", "port", "loglevel", "uvicorn_log_level", "log_format", "served_model_name", "api_key",
                     "allowed_origins", "metrics_public", "responses_store_size", "model_cache_dir", "torch_profiling",
                     "torch_profiling_dir", "torch_profiling_steps", "failpoints"],
                    "transport, access, logging, profiling and chaos testing"),
}


def combinations(family: Family) -> tuple[list[dict], list[dict]]:
    return covering_rows(MODES, lambda row: refusal({**family.settings, **row}, DEVICE))


def served_cases() -> list:
    return [pytest.param(name, dtype, row, id=f"{name}-{dtype}-{row_name(row, DEFAULTS)}")
            for name, family in FAMILIES.items() for dtype in matrix_dtypes(DEVICE) for row in combinations(family)[0]]


def refused_cases() -> list:
    return [pytest.param(name, row, id=f"{name}-{row_name(row, DEFAULTS)}")
            for name, family in FAMILIES.items() for row in combinations(family)[1]]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    @functools.cache
    def saved(name: str) -> Path:
        folder = tmp_path_factory.mktemp(name)
        FAMILIES[name].save(folder)
        return folder
    return saved


@functools.cache
def reference_model(name: str, folder: Path, dtype: str, int8: bool, hqq: bool):
    config = Config(torch_dtype=dtype, int8=int8, hqq=hqq)
    return FAMILIES[name].reference(folder, config)


@pytest.mark.parametrize("name, dtype, modes", served_cases())
def test_every_served_token_is_transformers_choice(checkpoint, name, dtype, modes):
    family, folder = FAMILIES[name], checkpoint(name)
    config = family.config(folder, dtype, modes)
    loaded = family.load(config)
    requests = family.requests(loaded)

    async def body(engine):
        together = await serve_together(engine, requests)
        return together, (await serve_alone(engine, requests) if config.batch_invariant else None)

    together, alone = run_with_engine(lambda: family.engine(loaded, config), body)
    problems = list(divergences(name, folder, config, requests, together))
    assert not problems, "\n".join(problems)
    assert [len(served.tokens) for served in together] == [len(s.logprobs) for s in together]
    if not (config.int8 or config.hqq):  # a checkpoint whose answers hardly vary could hide a bug (quantised, they
        # may vary less)
        assert len({token for served in together for token in served.tokens}) >= 6, "the answers should vary"
    if alone is not None:
        assert alone == together


def divergences(name: str, folder: Path, config: Config, requests: list, together: list) -> Iterator[str]:
    """Each request's first token beyond the bound, against transformers in the configuration's dtype and in
    float32 (with the same quantisation)."""
    family = FAMILIES[name]
    same, float32 = (reference_model(name, folder, dtype, config.int8, config.hqq)
                     for dtype in (config.torch_dtype, "float32"))
    for index, (request, served) in enumerate(zip(requests, together)):
        problem = divergence(served, family.reference_logprobs(same, request, served.tokens), bound(config),
                             family.reference_logprobs(float32, request, served.tokens))
        if problem:
            yield f"request {index}: {problem}"


@pytest.mark.parametrize("name, modes", refused_cases())
def test_combinations_the_server_cannot_serve_are_refused_at_start_up(name, modes, capsys):
    settings = {"hf_model": "a-checkpoint", **FAMILIES[name].settings, **modes}
    with pytest.raises(SystemExit):
        parse_config(command_line(settings))
    assert refusal(settings) in capsys.readouterr().err


def command_line(settings: dict) -> list[str]:
    flags = {f.name: f.metadata["flag"] for f in fields(Config)}
    return [part for name, value in settings.items() if value is not None
            for part in (flags[name], str(value).lower() if isinstance(value, bool) else str(value))]


def test_every_flag_is_a_serving_mode_or_says_why_it_cannot_change_answers():
    assert {f.name for f in fields(Config)} - set(MODES) == set(NOT_MODES)
    assert not set(MODES) & set(NOT_MODES)
    help_text = build_parser().format_help()
    assert all(Config.__dataclass_fields__[name].metadata["flag"] in help_text for name in MODES)


def test_every_family_the_server_accepts_is_in_the_matrix():
    assert set(SERVED_FAMILIES) <= set(FAMILIES)


@pytest.mark.parametrize("name", FAMILIES)
def test_the_combinations_hold_every_pair_of_mode_values_the_server_accepts(name):
    rows, refused = combinations(FAMILIES[name])
    served = set().union(*(pairs(row) for row in rows))
    every = set().union(*(pairs({**DEFAULTS, a: x, b: y}) for a in MODES for b in MODES if a < b
                          for x in MODES[a] for y in MODES[b]))
    assert every - served == set().union(*(pairs(row) for row in refused)) - served
    assert all(refusal({**FAMILIES[name].settings, **row}, DEVICE) for row in refused)
    assert rows[0] == DEFAULTS and len(rows) > len(MODES)  # the defaults, then each mode alone at least
