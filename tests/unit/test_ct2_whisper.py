"""The CTranslate2 Whisper converter: the model.bin parser on synthetic files, the weight mapping on a
random small Whisper, and the embedded tiny.en converted once per session, loaded strictly and run."""

import json
import shutil
import struct
import subprocess
import wave
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import WhisperConfig, WhisperForConditionalGeneration, WhisperProcessor

from converters.ct2_whisper import (
    EMBEDDED_WHISPER_NAME,
    CT2FormatError,
    cached_ct2_whisper_conversion,
    ct2_to_hf_state_dict,
    embedded_whisper_path,
    parse_ct2_model,
    read_ct2_model,
    read_ct2_model_file,
    whisper_config_from_ct2,
    whisper_generation_config,
)

SENTENCE = "The quick brown fox jumps over the lazy dog"
DTYPE_IDS = {np.dtype("<f4"): 0, np.dtype("i1"): 1, np.dtype("<i2"): 2, np.dtype("<i4"): 3, np.dtype("<f2"): 4}
# tiny.en special ids
END_OF_TEXT, START_OF_TRANSCRIPT, NO_TIMESTAMPS = 50256, 50257, 50362


# ---------------------------------------------------------------- a model.bin writer of the test's own


def ct2_string(text: str) -> bytes:
    raw = text.encode() + b"\0"
    return struct.pack("<H", len(raw)) + raw


def ct2_variable(name: str, array: np.ndarray, type_id: int | None = None) -> bytes:
    type_id = DTYPE_IDS[array.dtype] if type_id is None else type_id
    data = array.tobytes()
    return (ct2_string(name) + struct.pack("<B", array.ndim) + struct.pack(f"<{array.ndim}I", *array.shape)
            + struct.pack("<BI", type_id, len(data)) + data)


def ct2_model_bin(variables: list[bytes], aliases: dict[str, str], version: int = 6, spec: str = "WhisperSpec",
                  revision: int = 3) -> bytes:
    out = struct.pack("<I", version) + ct2_string(spec) + struct.pack("<II", revision, len(variables))
    out += b"".join(variables) + struct.pack("<I", len(aliases))
    for alias, target in aliases.items():
        out += ct2_string(alias) + ct2_string(target)
    return out


@pytest.fixture
def synthetic_arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "encoder/num_heads": np.array(6, dtype="<i2"),
        "decoder/activation": np.array(3, dtype="i1"),
        "decoder/embeddings/weight": rng.standard_normal((5, 3)).astype("<f2"),
        "encoder/layer_0/self_attention/linear_0/bias": rng.standard_normal(9).astype("<f4"),
        "decoder/ids": np.arange(4, dtype="<i4"),
        "decoder/layer_0/ffn/linear_0/weight": rng.integers(-127, 128, (2, 4)).astype("i1"),
    }


def test_parser_reads_a_synthetic_model_bin(synthetic_arrays):
    bf16 = torch.tensor([1.5, -2.25], dtype=torch.bfloat16)
    variables = [ct2_variable(name, array) for name, array in synthetic_arrays.items()]
    variables.append(ct2_variable("decoder/scale", bf16.view(torch.int16).numpy(), type_id=5))
    data = ct2_model_bin(variables, {"decoder/projection/weight": "decoder/embeddings/weight"}, revision=7)

    model = parse_ct2_model(data)
    assert (model.version, model.spec, model.revision) == (6, "WhisperSpec", 7)
    assert list(model.variables) == [*synthetic_arrays, "decoder/scale"]
    assert model.aliases == {"decoder/projection/weight": "decoder/embeddings/weight"}
    for name, array in synthetic_arrays.items():
        tensor = model.variables[name]
        assert tuple(tensor.shape) == array.shape, name
        assert tensor.numpy().dtype == array.dtype, name
        np.testing.assert_array_equal(tensor.numpy(), array)
    assert model.variables["decoder/scale"].dtype == torch.bfloat16
    assert torch.equal(model.variables["decoder/scale"], bf16)
    assert int(model.variables["encoder/num_heads"]) == 6


def test_read_ct2_model_resolves_aliases(tmp_path, synthetic_arrays):
    variables = [ct2_variable(name, array) for name, array in synthetic_arrays.items()]
    aliases = {"decoder/projection/weight": "decoder/embeddings/weight"}
    (tmp_path / "model.bin").write_bytes(ct2_model_bin(variables, aliases))
    for source in (tmp_path, tmp_path / "model.bin"):
        tensors = read_ct2_model(source)
        assert set(tensors) == {*synthetic_arrays, "decoder/projection/weight"}
        np.testing.assert_array_equal(tensors["decoder/projection/weight"].numpy(),
                                      synthetic_arrays["decoder/embeddings/weight"])


def test_parser_rejects_malformed_files(tmp_path, synthetic_arrays):
    good = [ct2_variable(name, array) for name, array in synthetic_arrays.items()]
    data = ct2_model_bin(good, {})
    parse_ct2_model(data)  # the baseline parses
    with pytest.raises(CT2FormatError, match="truncated"):
        parse_ct2_model(data[:-30])
    with pytest.raises(CT2FormatError, match="unexpected bytes"):
        parse_ct2_model(data + b"\0")
    with pytest.raises(CT2FormatError, match="version 5"):
        parse_ct2_model(ct2_model_bin(good, {}, version=5))
    (tmp_path / "model.bin").write_bytes(ct2_model_bin(good, {"a": "nowhere"}))
    with pytest.raises(CT2FormatError, match="alias a points to a missing variable nowhere"):
        read_ct2_model(tmp_path)
    no_nul = struct.pack("<H", 3) + b"abc"
    with pytest.raises(CT2FormatError, match="NUL"):
        parse_ct2_model(struct.pack("<I", 6) + no_nul + struct.pack("<II", 1, 0) + struct.pack("<I", 0))
    wrong_count = bytearray(ct2_variable("x", np.zeros(4, dtype="<f4")))
    struct.pack_into("<I", wrong_count, len(ct2_string("x")) + 1 + 4 + 1, 12)  # byte count 12, not 16
    with pytest.raises(CT2FormatError, match="holds 12 bytes, expected 16"):
        parse_ct2_model(ct2_model_bin([bytes(wrong_count)], {}))
    with pytest.raises(CT2FormatError, match="unknown dtype id 9"):
        parse_ct2_model(ct2_model_bin([ct2_variable("x", np.zeros(2, dtype="<f4"), type_id=9)], {}))


# ---------------------------------------------------------------- weight mapping on a random small Whisper


def hf_to_ct2(state: dict[str, torch.Tensor], config: WhisperConfig) -> dict[str, torch.Tensor]:
    """The inverse of the converter's mapping, written independently from the CT2 naming rules."""
    out = {"encoder/num_heads": torch.tensor(config.encoder_attention_heads, dtype=torch.int16),
           "decoder/num_heads": torch.tensor(config.decoder_attention_heads, dtype=torch.int16),
           "decoder/activation": torch.tensor(3, dtype=torch.int8),
           "decoder/pre_norm": torch.tensor(1, dtype=torch.int8)}

    def put(ct2, hf, bias=True):
        out[f"{ct2}/weight"] = state[f"{hf}.weight"]
        if bias:
            out[f"{ct2}/bias"] = state[f"{hf}.bias"]

    def norm(ct2, hf):
        out[f"{ct2}/gamma"], out[f"{ct2}/beta"] = state[f"{hf}.weight"], state[f"{hf}.bias"]

    def attention(ct2, hf):
        zeros = torch.zeros_like(state[f"{hf}.self_attn.q_proj.bias"])
        out[f"{ct2}/self_attention/linear_0/weight"] = torch.cat([state[f"{hf}.self_attn.{p}_proj.weight"]
                                                                  for p in "qkv"])
        out[f"{ct2}/self_attention/linear_0/bias"] = torch.cat([state[f"{hf}.self_attn.q_proj.bias"], zeros,
                                                                state[f"{hf}.self_attn.v_proj.bias"]])
        put(f"{ct2}/self_attention/linear_1", f"{hf}.self_attn.out_proj")
        norm(f"{ct2}/self_attention/layer_norm", f"{hf}.self_attn_layer_norm")
        put(f"{ct2}/ffn/linear_0", f"{hf}.fc1")
        put(f"{ct2}/ffn/linear_1", f"{hf}.fc2")
        norm(f"{ct2}/ffn/layer_norm", f"{hf}.final_layer_norm")

    put("encoder/conv1", "model.encoder.conv1")
    put("encoder/conv2", "model.encoder.conv2")
    out["encoder/position_encodings/encodings"] = state["model.encoder.embed_positions.weight"]
    for i in range(config.encoder_layers):
        attention(f"encoder/layer_{i}", f"model.encoder.layers.{i}")
    norm("encoder/layer_norm", "model.encoder.layer_norm")
    out["decoder/embeddings/weight"] = state["model.decoder.embed_tokens.weight"]
    out["decoder/projection/weight"] = out["decoder/embeddings/weight"]  # what the alias resolves to
    out["decoder/position_encodings/encodings"] = state["model.decoder.embed_positions.weight"]
    for i in range(config.decoder_layers):
        ct2, hf = f"decoder/layer_{i}", f"model.decoder.layers.{i}"
        attention(ct2, hf)
        put(f"{ct2}/attention/linear_0", f"{hf}.encoder_attn.q_proj")
        out[f"{ct2}/attention/linear_1/weight"] = torch.cat([state[f"{hf}.encoder_attn.k_proj.weight"],
                                                             state[f"{hf}.encoder_attn.v_proj.weight"]])
        out[f"{ct2}/attention/linear_1/bias"] = torch.cat([torch.zeros_like(state[f"{hf}.encoder_attn.v_proj.bias"]),
                                                           state[f"{hf}.encoder_attn.v_proj.bias"]])
        put(f"{ct2}/attention/linear_2", f"{hf}.encoder_attn.out_proj")
        norm(f"{ct2}/attention/layer_norm", f"{hf}.encoder_attn_layer_norm")
    norm("decoder/layer_norm", "model.decoder.layer_norm")
    return out


@pytest.fixture(scope="module")
def small_multilingual_whisper():
    """A random Whisper with sizes unlike tiny.en, and a multilingual-sized vocabulary."""
    torch.manual_seed(0)
    config = WhisperConfig(vocab_size=51866, num_mel_bins=128, d_model=64, encoder_layers=2, decoder_layers=3,
                           encoder_attention_heads=4, decoder_attention_heads=2, encoder_ffn_dim=96,
                           decoder_ffn_dim=160, max_source_positions=20, max_target_positions=24)
    model = WhisperForConditionalGeneration(config).eval()
    for parameter in model.parameters():  # biases and norms start at 0/1: make every value distinctive
        torch.nn.init.normal_(parameter.data)
    model.tie_weights()
    return model


def test_mapping_round_trips_a_small_whisper(small_multilingual_whisper):
    model = small_multilingual_whisper
    state = model.state_dict()
    converted = ct2_to_hf_state_dict(hf_to_ct2(state, model.config))
    assert set(converted) == set(state)
    for name, tensor in state.items():
        assert converted[name].dtype == torch.float32, name
        assert torch.equal(converted[name], tensor), name


def test_mapping_reports_unknown_and_missing_variables(small_multilingual_whisper):
    variables = hf_to_ct2(small_multilingual_whisper.state_dict(), small_multilingual_whisper.config)
    with pytest.raises(CT2FormatError, match="no Whisper counterpart: decoder/extra/weight"):
        ct2_to_hf_state_dict({**variables, "decoder/extra/weight": torch.zeros(2, 2)})
    del variables["decoder/layer_2/attention/linear_2/bias"]
    with pytest.raises(CT2FormatError, match="no variable decoder/layer_2/attention/linear_2/bias"):
        ct2_to_hf_state_dict(variables)


def test_mapping_dequantizes_int8_weights(small_multilingual_whisper):
    """CT2 int8 stores round(weight * scale) per output row with the scale in <name>_scale."""
    variables = hf_to_ct2(small_multilingual_whisper.state_dict(), small_multilingual_whisper.config)
    weight = variables["encoder/layer_1/ffn/linear_0/weight"]
    scale = 127 / weight.abs().amax(dim=1)
    variables["encoder/layer_1/ffn/linear_0/weight"] = torch.round(weight * scale[:, None]).to(torch.int8)
    variables["encoder/layer_1/ffn/linear_0/weight_scale"] = scale
    converted = ct2_to_hf_state_dict(variables)["model.encoder.layers.1.fc1.weight"]
    assert converted.dtype == torch.float32
    torch.testing.assert_close(converted, weight, atol=(weight.abs().amax() / 127).item(), rtol=0)
    assert not torch.equal(converted, weight)  # it really went through int8


def test_config_is_inferred_from_shapes(small_multilingual_whisper):
    model = small_multilingual_whisper
    variables = hf_to_ct2(model.state_dict(), model.config)
    token_ids = {"<|endoftext|>": 50257, "<|startoftranscript|>": 50258, "<|en|>": 50259, "<|de|>": 50261,
                 "<|translate|>": 50358, "<|transcribe|>": 50359, "<|startofprev|>": 50361,
                 "<|notimestamps|>": 50363}
    ct2_config = {"suppress_ids": [1, 2], "suppress_ids_begin": [220, 50257], "lang_ids": [50259, 50261],
                  "alignment_heads": [[2, 1], [1, 0]]}
    config = whisper_config_from_ct2(variables, ct2_config, token_ids)
    expected = model.config
    for key in ("vocab_size", "num_mel_bins", "d_model", "encoder_layers", "decoder_layers", "encoder_attention_heads",
                "decoder_attention_heads", "encoder_ffn_dim", "decoder_ffn_dim", "max_source_positions",
                "max_target_positions"):
        assert getattr(config, key) == getattr(expected, key), key
    assert (config.decoder_start_token_id, config.eos_token_id, config.pad_token_id) == (50258, 50257, 50257)
    assert config.suppress_tokens == [1, 2] and config.begin_suppress_tokens == [220, 50257]
    assert config.tie_word_embeddings
    generation = whisper_generation_config(config, ct2_config, token_ids)
    assert generation.is_multilingual is True
    assert generation.no_timestamps_token_id == 50363
    assert generation.lang_to_id == {"<|en|>": 50259, "<|de|>": 50261}
    assert generation.task_to_id == {"transcribe": 50359, "translate": 50358}
    assert generation.alignment_heads == [[2, 1], [1, 0]]
    assert generation.max_length == 24


# ---------------------------------------------------------------- the embedded tiny.en


@pytest.fixture(scope="session")
def tiny_en_ct2() -> Path:
    return embedded_whisper_path()


@pytest.fixture(scope="session")
def converted_tiny_en(tiny_en_ct2, tmp_path_factory) -> Path:
    return cached_ct2_whisper_conversion(tiny_en_ct2, tmp_path_factory.mktemp("whisper-cache"),
                                         name=EMBEDDED_WHISPER_NAME)


@pytest.fixture(scope="session")
def tiny_en(converted_tiny_en):
    model, info = WhisperForConditionalGeneration.from_pretrained(converted_tiny_en, output_loading_info=True)
    return model.eval(), info


@pytest.fixture(scope="session")
def processor(converted_tiny_en) -> WhisperProcessor:
    return WhisperProcessor.from_pretrained(converted_tiny_en)


def test_embedded_path_is_a_ct2_folder(tiny_en_ct2):
    for name in ("model.bin", "config.json", "tokenizer.json", "vocabulary.txt"):
        assert (tiny_en_ct2 / name).is_file(), name


def test_embedded_model_bin_parses(tiny_en_ct2):
    model = read_ct2_model_file(tiny_en_ct2)
    assert (model.version, model.spec) == (6, "WhisperSpec")
    assert len(model.variables) == 148
    assert model.aliases == {"decoder/projection/weight": "decoder/embeddings/weight"}
    tensors = read_ct2_model(tiny_en_ct2)
    assert len(tensors) == 149
    expected = {
        "decoder/embeddings/weight": (51864, 384),
        "decoder/projection/weight": (51864, 384),
        "encoder/conv1/weight": (384, 80, 3),
        "encoder/conv2/weight": (384, 384, 3),
        "encoder/position_encodings/encodings": (1500, 384),
        "decoder/position_encodings/encodings": (448, 384),
        "encoder/layer_3/self_attention/linear_0/weight": (1152, 384),
        "decoder/layer_3/attention/linear_1/weight": (768, 384),
        "decoder/layer_0/ffn/linear_0/weight": (1536, 384),
        "decoder/layer_norm/gamma": (384,),
    }
    for name, shape in expected.items():
        assert tuple(tensors[name].shape) == shape, name
        assert tensors[name].dtype == torch.float16, name
    assert not any(name.startswith(("encoder/layer_4/", "decoder/layer_4/")) for name in tensors)
    assert int(tensors["encoder/num_heads"]) == int(tensors["decoder/num_heads"]) == 6
    assert torch.isfinite(tensors["decoder/embeddings/weight"].float()).all()


def test_converted_checkpoint_loads_strictly(tiny_en, tiny_en_ct2):
    model, info = tiny_en
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set()
    assert info["mismatched_keys"] == set() and info["error_msgs"] == []
    reference = WhisperForConditionalGeneration(model.config).state_dict()
    state = model.state_dict()
    assert set(state) == set(reference)
    for name, tensor in reference.items():
        assert state[name].shape == tensor.shape, name
        assert state[name].dtype == torch.float32, name
    assert model.proj_out.weight.data_ptr() == model.model.decoder.embed_tokens.weight.data_ptr()

    ct2 = read_ct2_model(tiny_en_ct2)
    fused = ct2["encoder/layer_2/self_attention/linear_0/weight"].float()
    attn = model.model.encoder.layers[2].self_attn
    assert torch.equal(attn.q_proj.weight, fused[:384])
    assert torch.equal(attn.k_proj.weight, fused[384:768])
    assert torch.equal(attn.v_proj.weight, fused[768:])
    assert torch.equal(attn.v_proj.bias, ct2["encoder/layer_2/self_attention/linear_0/bias"].float()[768:])
    cross = model.model.decoder.layers[1].encoder_attn
    assert torch.equal(cross.q_proj.weight, ct2["decoder/layer_1/attention/linear_0/weight"].float())
    assert torch.equal(cross.v_proj.weight, ct2["decoder/layer_1/attention/linear_1/weight"].float()[384:])
    assert torch.equal(model.model.decoder.layers[3].fc2.weight, ct2["decoder/layer_3/ffn/linear_1/weight"].float())


def test_converted_config(tiny_en, converted_tiny_en):
    config = tiny_en[0].config
    assert (config.vocab_size, config.d_model, config.num_mel_bins) == (51864, 384, 80)
    assert (config.encoder_layers, config.decoder_layers) == (4, 4)
    assert (config.encoder_attention_heads, config.decoder_attention_heads) == (6, 6)
    assert (config.encoder_ffn_dim, config.max_source_positions, config.max_target_positions) == (1536, 1500, 448)
    assert (config.decoder_start_token_id, config.eos_token_id, config.pad_token_id) == (START_OF_TRANSCRIPT,
                                                                                         END_OF_TEXT, END_OF_TEXT)
    saved = json.loads((converted_tiny_en / "config.json").read_text())
    assert saved["dtype"] == "float32"
    generation = tiny_en[0].generation_config
    assert generation.no_timestamps_token_id == NO_TIMESTAMPS
    assert generation.decoder_start_token_id == START_OF_TRANSCRIPT
    assert generation.forced_decoder_ids is None
    assert generation.is_multilingual is False
    assert generation.return_timestamps is False
    assert generation.begin_suppress_tokens == [220, END_OF_TEXT]
    assert START_OF_TRANSCRIPT in generation.suppress_tokens and len(generation.suppress_tokens) == 90
    assert generation.alignment_heads[:2] == [[1, 0], [2, 0]] and len(generation.alignment_heads) == 8


def test_processor(processor):
    assert processor.feature_extractor.feature_size == 80
    assert processor.feature_extractor.sampling_rate == 16000
    tokenizer = processor.tokenizer
    assert len(tokenizer) == 51864
    assert tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|startoftranscript|>", "<|notimestamps|>",
                                            "<|0.00|>", "<|30.00|>"]) == [50256, 50257, 50362, 50363, 51863]
    assert tokenizer.all_special_ids[-1] == NO_TIMESTAMPS  # WhisperTokenizer's first timestamp is this + 1
    assert tokenizer(" hello").input_ids == [START_OF_TRANSCRIPT, NO_TIMESTAMPS, 23748, END_OF_TEXT]
    ids = [START_OF_TRANSCRIPT, 50363, 383, 2068, 50413, END_OF_TEXT]
    assert tokenizer.decode(ids, skip_special_tokens=True) == " The quick"
    assert tokenizer.decode(ids, decode_with_timestamps=True, skip_special_tokens=True) == "<|0.00|> The quick<|1.00|>"
    assert tokenizer.decode(ids, output_offsets=True)["offsets"] == [{"text": " The quick", "timestamp": (0.0, 1.0)}]


def test_forward_gives_finite_logits(tiny_en):
    model = tiny_en[0]
    torch.manual_seed(0)
    features = torch.randn(1, 80, 3000)
    decoder_ids = torch.tensor([[START_OF_TRANSCRIPT, NO_TIMESTAMPS, 383, 2068]])
    with torch.inference_mode():
        logits = model(input_features=features, decoder_input_ids=decoder_ids).logits
    assert logits.shape == (1, 4, 51864)
    assert torch.isfinite(logits).all()
    assert logits.std() > 0.1


def test_the_cached_conversion_is_reused(converted_tiny_en, tiny_en_ct2):
    """(How the cache keys and prunes copies: tests/unit/test_converter_cache.py.)"""
    cache = converted_tiny_en.parent
    weights = converted_tiny_en / "model.safetensors"
    before = weights.stat().st_mtime_ns
    assert converted_tiny_en.name.startswith(f"{EMBEDDED_WHISPER_NAME}-")
    assert cached_ct2_whisper_conversion(tiny_en_ct2, cache, name=EMBEDDED_WHISPER_NAME) == converted_tiny_en
    assert weights.stat().st_mtime_ns == before  # not converted again
    assert [p.name for p in cache.iterdir()] == [converted_tiny_en.name]  # no staging folder left behind


# ---------------------------------------------------------------- end to end speech


def load_wav_16k(path: Path) -> np.ndarray:
    with wave.open(str(path)) as wav:
        assert wav.getsampwidth() == 2
        rate, channels = wav.getframerate(), wav.getnchannels()
        samples = np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2").astype(np.float64) / 32768
    samples = samples.reshape(-1, channels).mean(axis=1)
    if rate == 16000:
        return samples.astype(np.float32)
    # band-limited (FFT) resampling: keep the spectrum below the new Nyquist frequency
    count = round(len(samples) * 16000 / rate)
    spectrum = np.fft.rfft(samples)[: count // 2 + 1]
    return (np.fft.irfft(spectrum, count) * (count / len(samples))).astype(np.float32)


@pytest.fixture(scope="session")
def spoken_sentence(tmp_path_factory) -> np.ndarray:
    espeak = shutil.which("espeak-ng")
    if espeak is None:
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng); it synthesizes the test speech")
    path = tmp_path_factory.mktemp("speech") / "fox.wav"
    subprocess.run([espeak, "-s", "120", "-w", str(path), SENTENCE], check=True, capture_output=True, timeout=60)
    audio = load_wav_16k(path)
    assert 2.0 < len(audio) / 16000 < 10.0
    return audio


def test_transcribes_speech(tiny_en, processor, spoken_sentence):
    model = tiny_en[0]
    features = processor(spoken_sentence, sampling_rate=16000, return_tensors="pt").input_features
    assert features.shape == (1, 80, 3000)
    with torch.inference_mode():
        ids = model.generate(features)
    assert not any(token > NO_TIMESTAMPS for token in ids[0].tolist())  # no timestamps by default
    text = processor.batch_decode(ids, skip_special_tokens=True)[0].lower()
    print(f"transcript: {text!r}")
    for words in ("quick", "fox", "lazy dog"):
        assert words in text, text


def test_transcribes_speech_with_timestamps(tiny_en, processor, spoken_sentence):
    model = tiny_en[0]
    features = processor(spoken_sentence, sampling_rate=16000, return_tensors="pt").input_features
    with torch.inference_mode():
        ids = model.generate(features, return_timestamps=True)[0].tolist()
    timestamps = [token for token in ids if token > NO_TIMESTAMPS]
    assert len(timestamps) >= 2, ids
    offsets = processor.tokenizer.decode(ids, output_offsets=True)["offsets"]
    assert offsets, ids
    start, end = offsets[0]["timestamp"]
    assert 0.0 <= start < end <= 30.0
    assert "fox" in " ".join(o["text"] for o in offsets).lower()
