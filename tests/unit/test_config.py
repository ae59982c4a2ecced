import socket
import subprocess
import sys
from dataclasses import fields

import pytest

from config import Config, build_parser, parse_config
from tests.helpers.server_process import ROOT


def test_defaults_match_the_reference_cli(monkeypatch):
    for f in fields(Config):
        monkeypatch.delenv(f.metadata["env"], raising=False)
    config = parse_config([])
    assert (config.host, config.port, config.loglevel) == ("0.0.0.0", 7088, "INFO")
    assert config.continuous_batching_batch_size == 20 and config.continuous_batching_microsleep == 0
    assert config.max_concurrent == 100 and config.serving_type == "chat"
    assert config.static_cache is False and config.torch_compile_mode == "reduce-overhead"
    assert config.torch_compile == "auto"
    assert [parse_config(argv).torch_compile for argv in (["--torch-compile"], ["--torch-compile", "FALSE"],
                                                         ["--torch-compile", "Auto"])] == [True, False, "auto"]


def test_env_vars_are_read_and_flags_win(monkeypatch):
    monkeypatch.setenv("PORT", "9001")
    monkeypatch.setenv("CONTINUOUS_BATCHING_BATCH_SIZE", "7")
    monkeypatch.setenv("TOKENIZER_USE_FAST", "FALSE")
    config = parse_config(["--port", "9002"])
    assert config.port == 9002 and config.continuous_batching_batch_size == 7
    assert config.tokenizer_use_fast is False


@pytest.mark.parametrize("text, value", [("true", True), ("TRUE", True), ("1", True), ("False", False), ("0", False)])
def test_booleans_accept_true_false_one_zero_any_case(text, value):
    assert parse_config(["--tokenizer-use-fast", text]).tokenizer_use_fast is value


@pytest.mark.parametrize("argv, message", [
    (["--torch-compile-mode", "fastest"], "--torch-compile-mode"),
    (["--kv-cache-memory", "lots"], "lots"),
    (["--kv-cache-memory=0GiB"], "0GiB"),
    (["--max-num-batched-tokens", "8"], "--max-num-batched-tokens"),
    (["--hqq-nbits", "5"], "--hqq-nbits"),
    (["--torch-profiling-steps", "0"], "--torch-profiling-steps"),
    (["--max-audio-mb", "0"], "--max-audio-mb"),
    (["--tokenizer-use-fast", "maybe"], "maybe"),
    (["--continuous-batching-batch-size", "0"], "--continuous-batching-batch-size"),
    (["--max-memory", "0=20GiB"], "give --device-map too"),
    (["--device-map", "auto", "--max-memory", "0=0.5"], "needs a size"),
    (["--device-map", "auto", "--max-memory", "gpu0=20GiB"], "DEVICE=SIZE"),
    (["--device-map", "auto", "--serving-type", "whisper"], "Whisper models run on one device"),
    (["--device-map", "auto", "--hqq", "true"], "cannot be combined with --device-map"),
    (["--architecture-type", "encoder-decoder"], "needs --hf-model"),
    (["--architecture-type", "encoder-decoder", "--hf-model", "t5", "--device-map", "auto"], "do not take it yet"),
    (["--device-map", "auto", "--accelerator-type", "cpu"], "leave it unset"),
    (["--int8", "maybe"], "a model goes before bare flags"),
    (["one-model", "--model", "another"], "give it once"),
    (["--quantization", "awq"], "--quantization"),
    (["--max-logprobs", "-1"], "--max-logprobs"),
    (["--gpu-memory-utilization", "1.5"], "(0, 1]"),
    (["--gpu-memory-utilization", "0.9", "--kv-cache-memory", "4GiB"], "give one"),
    (["--gpu-memory-utilization", "0.9", "--accelerator-type", "cpu"], "on the CPU give --kv-cache-memory"),
    (["--tokenizer", "t", "--serving-type", "whisper"], "take theirs from their processor"),
    (["--loglevel", "loud"], "--loglevel"),
    (["--torch-compile", "maybe"], "expected true/false/1/0 or auto, got 'maybe'"),
    (["--chat-template", "/no/such/template.jinja"], "neither a readable file nor a Jinja template"),
    (["--chat-template", "{{ messages }}", "--serving-type", "whisper"], "prompts are audio"),
    (["--generation-config", "/no/such/folder"], "--generation-config is auto, none, or a folder"),
    (["--override-generation-config", "temperature=0.5"], "expected a JSON object"),
    (["--override-generation-config", '{"do_sample": true}'], "unsupported keys ['do_sample']"),
    (["--override-generation-config", '{"temperature": "hot"}'], "temperature must be a number"),
])
def test_unsupported_or_invalid_flags_fail_fast(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_config(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_whisper_may_be_named_an_encoder_decoder_as_the_reference_cli_does():
    config = parse_config(["--serving-type", "whisper", "--architecture-type", "encoder-decoder"])
    assert config.architecture_type == "encoder-decoder"


def test_max_memory_becomes_accelerates_byte_limits():
    config = parse_config(["--device-map", "auto", "--max-memory", "0=20GiB, 1=512MB,cpu=1e9"])
    assert config.weight_memory() == {0: 20 * 2**30, 1: 512 * 10**6, "cpu": 10**9}
    assert parse_config(["--device-map", "balanced"]).weight_memory() is None


def test_bad_env_value_names_the_variable(monkeypatch, capsys):
    monkeypatch.setenv("STATIC_CACHE", "yes please")
    with pytest.raises(SystemExit):
        parse_config([])
    assert "STATIC_CACHE" in capsys.readouterr().err


def test_help_lists_every_flag_with_env_and_default():
    result = subprocess.run([sys.executable, "main.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0
    help_text = " ".join(result.stdout.split())
    for f in fields(Config):
        assert f.metadata["flag"] in help_text and f"env {f.metadata['env']}" in help_text
    assert "(default: 7088)" in help_text


def test_vllm_spellings_set_the_same_fields_as_ours():
    config = parse_config(["some/model", "--dtype", "half", "--max-num-seqs", "4", "--enable-prefix-caching",
                           "--served-model-name", "a", "b", "--quantization", "hqq", "--uvicorn-log-level", "WARNING"])
    assert (config.hf_model, config.torch_dtype, config.continuous_batching_batch_size) == ("some/model", "float16", 4)
    assert config.prefix_caching is True and config.served_names("ignored") == ("a", "b") and config.hqq is True
    assert config.uvicorn_log_level == "warning"
    assert parse_config(["--model", "m", "--dtype", "float"]).hf_model == "m"
    assert parse_config(["--dtype", "float"]).torch_dtype == "float32"
    assert parse_config(["--no-enable-prefix-caching"]).prefix_caching is False
    assert parse_config(["--quantization", "int8"]).int8 is True
    assert parse_config(["--served-model-name", "a,b"]).served_names("x") == ("a", "b")


def test_boolean_flags_work_bare_or_with_a_value():
    assert parse_config(["--int8"]).int8 is True
    assert parse_config(["--int8", "true", "--static-cache", "0"]).static_cache is False
    config = parse_config(["m", "--trust-remote-code", "--enable-auto-tool-choice"])
    assert config.trust_remote_code is True and config.enable_auto_tool_choice is True and config.hf_model == "m"
    assert parse_config(["--int8", "--prefix-caching", "false"]).prefix_caching is False


def test_log_levels_and_dtypes_in_any_case(monkeypatch):
    assert parse_config(["--loglevel", "debug"]).loglevel == "DEBUG"
    monkeypatch.setenv("LOGLEVEL", "warning")
    assert parse_config([]).loglevel == "WARNING"
    assert parse_config(["--torch-dtype", "BFloat16"]).torch_dtype == "bfloat16"


def test_hostname_counts_only_when_it_is_not_the_machine_name(monkeypatch):
    monkeypatch.setenv("HOSTNAME", socket.gethostname())
    assert parse_config([]).host == "0.0.0.0"
    monkeypatch.setenv("HOSTNAME", "127.0.0.1")
    assert parse_config([]).host == "127.0.0.1"
    assert parse_config(["--host", "::1"]).host == "::1"


def test_hub_flags_reach_from_pretrained_only_when_given():
    assert Config().hub_options() == {}
    config = parse_config(["--revision", "v2", "--download-dir", "/models", "--trust-remote-code"])
    assert config.hub_options() == {"revision": "v2", "cache_dir": "/models", "trust_remote_code": True}


def test_the_seed_and_logprobs_limit_are_unset_by_default(monkeypatch):
    for f in fields(Config):
        monkeypatch.delenv(f.metadata["env"], raising=False)
    config = parse_config([])
    assert config.seed is None and config.max_logprobs is None and config.gpu_memory_utilization is None
    assert parse_config(["--seed", "3", "--max-logprobs", "50"]).max_logprobs == 50



def test_help_shows_the_aliases_and_the_hostname_rule():
    help_text = " ".join(build_parser().format_help().split())
    for alias in ("--model", "--dtype", "--max-num-seqs", "--enable-prefix-caching", "--no-enable-prefix-caching"):
        assert alias in help_text
    assert "not just this machine's name" in help_text and "always on" in help_text


def test_a_chat_template_is_a_file_or_inline_jinja(tmp_path):
    inline = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    (tmp_path / "chat.jinja").write_text(inline)
    assert parse_config(["--chat-template", inline]).chat_template_text() == inline
    assert parse_config(["--chat-template", str(tmp_path / "chat.jinja")]).chat_template_text() == inline
    assert parse_config([]).chat_template_text() is None
