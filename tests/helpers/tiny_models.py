"""Tiny random-weight decoders built from a config, loaded with the engine's attention function."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers

from batching import ATTENTION_NAME

TINY_SIZES = dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, positions=1024)


def tiny_config(architecture: str, vocab_size: int) -> transformers.PretrainedConfig:
    s = TINY_SIZES
    if architecture == "gpt2":
        return transformers.GPT2Config(vocab_size=vocab_size, n_embd=s["hidden"], n_layer=s["layers"],
                                       n_head=s["heads"], n_positions=s["positions"], eos_token_id=2, bos_token_id=1)
    config_class = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}[architecture]
    return config_class(vocab_size=vocab_size, hidden_size=s["hidden"], num_hidden_layers=s["layers"],
                        num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"],
                        intermediate_size=s["intermediate"], max_position_embeddings=s["positions"],
                        eos_token_id=2, bos_token_id=1, tie_word_embeddings=True)


def tiny_model(architecture: str, vocab_size: int, seed: int = 0) -> transformers.PreTrainedModel:
    """A random-weight model; weights are scaled up so greedy output varies token to token."""
    torch.manual_seed(seed)
    config = tiny_config(architecture, vocab_size)
    config._attn_implementation = ATTENTION_NAME
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=ATTENTION_NAME)
    return model.eval()


def byte_tokenizer(**special_tokens: str) -> transformers.PreTrainedTokenizerFast:
    """One token per byte (byte-level BPE without merges) after the special tokens (default: <eos> as token 0):
    grammar masks can be read off character by character."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    special_tokens = special_tokens or {"eos_token": "<eos>"}
    specials = list(dict.fromkeys(special_tokens.values()))
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: i for i, token in enumerate([*specials, *alphabet])}
    tokenizer = Tokenizer(models.BPE(vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, **special_tokens)


# special tokens as each family's real vocabularies place them
SEQ2SEQ_SPECIALS = {"t5": {"pad_token": "<pad>", "eos_token": "</s>"},
                    "bart": {"bos_token": "<s>", "pad_token": "<pad>", "eos_token": "</s>"}}


def tiny_seq2seq(architecture: str, seed: int = 0, tokenizer: transformers.PreTrainedTokenizerBase | None = None
                 ) -> tuple[transformers.PreTrainedModel, transformers.PreTrainedTokenizerBase]:
    """A random-weight encoder-decoder: t5 (T5 v1.0: ReLU, tied and scaled head), flan-t5 (T5 v1.1: gated GELU,
    untied head), mt5, or bart; over `tokenizer`'s vocabulary, or a byte tokenizer with its family's special
    tokens."""
    family = "bart" if architecture == "bart" else "t5"
    tokenizer = tokenizer or byte_tokenizer(**SEQ2SEQ_SPECIALS[family])
    ids = {"pad_token_id": tokenizer.pad_token_id or 0, "eos_token_id": tokenizer.eos_token_id}
    if family == "bart":
        ids["bos_token_id"] = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else 1
    s, vocab = TINY_SIZES, len(tokenizer)
    torch.manual_seed(seed)
    if family == "t5":
        config_class = transformers.MT5Config if architecture == "mt5" else transformers.T5Config
        config = config_class(vocab_size=vocab, d_model=s["hidden"], d_kv=16, d_ff=s["intermediate"],
                              num_layers=s["layers"], num_heads=s["heads"], decoder_start_token_id=ids["pad_token_id"],
                              feed_forward_proj="relu" if architecture == "t5" else "gated-gelu",
                              tie_word_embeddings=architecture == "t5", **ids)
    else:
        config = transformers.BartConfig(vocab_size=vocab, d_model=s["hidden"], encoder_layers=s["layers"],
                                         decoder_layers=s["layers"], encoder_attention_heads=s["heads"],
                                         decoder_attention_heads=s["heads"], encoder_ffn_dim=s["intermediate"],
                                         decoder_ffn_dim=s["intermediate"], max_position_embeddings=s["positions"],
                                         decoder_start_token_id=ids["eos_token_id"], forced_eos_token_id=None,
                                         scale_embedding=True, **ids)
    model = transformers.AutoModelForSeq2SeqLM.from_config(config).eval()
    # larger weights than the initialiser's, so greedy output varies token to token (gated layers grow faster)
    scale = 2.0 if architecture in ("flan-t5", "mt5") else 8.0
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(scale)
    return model, tokenizer


def vision_template(image: str = "<image>") -> str:
    """As LLaVA's own templates do, it reads every message's content as a list of parts; `image` stands for one."""
    return ("{% for message in messages %}<|{{ message['role'] }}|>{% for part in message['content'] %}"
            "{% if part['type'] == 'image' %}" + image + "{% else %}{{ part['text'] }}{% endif %}{% endfor %}\n"
            "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")


QWEN2_VL_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]


def tiny_vision_model(family: str, seed: int = 0, attention: str = ATTENTION_NAME,
                      tokenizer: transformers.PreTrainedTokenizerBase | None = None
                      ) -> tuple[transformers.PreTrainedModel, transformers.ProcessorMixin]:
    """A random-weight vision-language model with a tiny text model (on `attention`), and its processor over
    `tokenizer` (by default a byte tokenizer) plus the family's image tokens:
    llava: a 2-layer CLIP tower on 32 x 32 images, 16 placeholders per image;
    idefics3 (SmolVLM's architecture): a 2-layer SigLIP tower on 32 x 32 tiles, an image cut into tiles plus a
    global view, 4 placeholders each; smolvlm (SmolVLM2's) the same, its processor built without torchvision;
    qwen2_vl: a 2-layer tower on 4 x 4 patches of an image resized to 256-1024 pixels at its own aspect, one
    placeholder per 2 x 2 patches, a Qwen2-VL text model with 3-D rotary positions; qwen2_5_vl the same with
    Qwen2.5-VL's tower (window attention in its first layer)."""
    from model_manager import without_videos
    tokenizer = tokenizer or byte_tokenizer()
    qwen = family in ("qwen2_vl", "qwen2_5_vl")
    if qwen:
        tokenizer.add_tokens(QWEN2_VL_TOKENS, special_tokens=True)
        images = transformers.Qwen2VLImageProcessorPil(patch_size=4, merge_size=2, temporal_patch_size=2,
                                                       min_pixels=16 * 16, max_pixels=32 * 32)
        processor_class = transformers.Qwen2VLProcessor if family == "qwen2_vl" else transformers.Qwen2_5_VLProcessor
        processor = without_videos(processor_class)(
            image_processor=images, tokenizer=tokenizer, video_processor=None,
            chat_template=vision_template("<|vision_start|><|image_pad|><|vision_end|>"))
    else:
        tokenizer.add_tokens(["<image>"], special_tokens=True)
    if family == "llava":
        images = transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
        processor = transformers.LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=8,
                                                vision_feature_select_strategy="default",
                                                num_additional_image_tokens=1, chat_template=vision_template())
    elif family == "idefics3":
        images = transformers.Idefics3ImageProcessorPil(size={"longest_edge": 64}, max_image_size={"longest_edge": 32})
        processor = transformers.Idefics3Processor(image_processor=images, tokenizer=tokenizer, image_seq_len=4,
                                                   chat_template=vision_template())
    elif family == "smolvlm":
        images = transformers.SmolVLMImageProcessorPil(size={"longest_edge": 64}, max_image_size={"longest_edge": 32})
        processor = without_videos(transformers.SmolVLMProcessor)(
            image_processor=images, tokenizer=tokenizer, video_processor=None, image_seq_len=4,
            chat_template=vision_template())
    s = TINY_SIZES
    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                 patch_size=8)
    text = dict(vocab_size=len(tokenizer), hidden_size=s["hidden"], num_hidden_layers=s["layers"],
                num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"], intermediate_size=s["intermediate"],
                max_position_embeddings=s["positions"], eos_token_id=tokenizer.eos_token_id)
    placeholder = tokenizer.convert_tokens_to_ids("<|image_pad|>" if qwen else "<image>")
    if family == "llava":
        config = transformers.LlavaConfig(vision_config=transformers.CLIPVisionConfig(**tower),
                                          text_config=transformers.LlamaConfig(**text), vision_feature_layer=-1,
                                          image_token_id=placeholder)
    elif family in ("idefics3", "smolvlm"):
        config_class = transformers.Idefics3Config if family == "idefics3" else transformers.SmolVLMConfig
        config = config_class(vision_config=tower, text_config=transformers.LlamaConfig(**text),
                              image_token_id=placeholder, scale_factor=2)
    else:  # 16 rotary frequencies per head: 4 for time, 6 for height, 6 for width
        start, end, _, video = tokenizer.convert_tokens_to_ids(QWEN2_VL_TOKENS)
        text["bos_token_id"] = None
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
        patches = dict(depth=2, num_heads=4, patch_size=4, spatial_merge_size=2, temporal_patch_size=2)
        if family == "qwen2_vl":
            config_class, tower = transformers.Qwen2VLConfig, dict(embed_dim=32, hidden_size=s["hidden"], mlp_ratio=2)
        else:  # windows of 8 x 8 pixels (2 x 2 merged patches) in the first layer, the whole image in the second
            config_class, tower = transformers.Qwen2_5_VLConfig, dict(
                hidden_size=32, intermediate_size=64, out_hidden_size=s["hidden"], window_size=8,
                fullatt_block_indexes=[1])
        config = config_class(text_config=text, vision_config={**patches, **tower}, image_token_id=placeholder,
                              video_token_id=video, vision_start_token_id=start, vision_end_token_id=end)
    torch.manual_seed(seed)
    model = transformers.AutoModelForImageTextToText.from_config(
        config, attn_implementation={"": "sdpa", "vision_config": "sdpa", "text_config": attention}).eval()
    with torch.no_grad():  # larger weights than the initialiser's, so greedy output varies token to token
        for parameter in model.parameters():
            parameter.mul_(4.0)
    return model, processor


def save_vision_processor(processor: transformers.ProcessorMixin, folder: Path) -> None:
    """As a checkpoint holds it; one built without its video processor (no torchvision) saves its other parts."""
    if getattr(processor, "video_processor", True) is not None:
        return processor.save_pretrained(folder)
    processor.tokenizer.save_pretrained(folder)
    processor.image_processor.save_pretrained(folder)
    (folder / "chat_template.jinja").write_text(processor.chat_template)
    settings = {name: value for name, value in processor.to_dict().items()
                if name not in ("image_processor", "video_processor", "tokenizer", "chat_template")}
    (folder / "processor_config.json").write_text(json.dumps(settings))
