"""Images in a decoder's prompt (vision-language models: LLaVA, Idefics3 as SmolVLM has it, Qwen2-VL): the
model's processor expands each image into placeholder tokens; the engine runs the vision tower once per image,
batched over the sequences a step starts, keeps the features on the sequence, and writes them over the
placeholders' embeddings in whichever prompt chunk reaches them. Everything else (attention, KV memory, sampling)
is the text model's; so are positions, but for Qwen2-VL's 3-D rotary ones (time, height, width), which place an
image's placeholders on its grid and shift the text after it."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Mapping, NamedTuple

import torch
from torch.nn.utils.rnn import pad_sequence
from transformers import PreTrainedModel

from batching.sequence import Sequence


@dataclass(eq=False)
class ImageInputs:
    """A prompt's images as the model's processor prepared them, and their features once the vision tower ran."""
    pixels: dict[str, torch.Tensor]  # the processor's image tensors (pixel_values, and e.g. image_sizes)
    token_id: int  # the placeholder token
    kv_prompt: list[int]  # the prompt with its placeholders marked by its images' digest: the prefix cache's keys
    features: torch.Tensor | None = None  # [placeholders, hidden], in prompt order
    rope_positions: torch.Tensor | None = None  # Qwen2-VL: the prompt's [3, tokens] rotary positions
    rope_delta: int = 0  # ...and what a token after the prompt adds to its index: its position is index + delta

    def position_rows(self, start: int, end: int) -> torch.Tensor:
        """The [3, end - start] rotary positions of tokens start..end, within the prompt or after it."""
        prompt, prompt_length = self.rope_positions[:, start:end], self.rope_positions.shape[1]
        after = torch.arange(max(start, prompt_length), max(end, prompt_length)) + self.rope_delta
        return torch.cat([prompt, after.expand(3, -1)], dim=1)

    def positions(self, ids: list[int], start: int, end: int) -> tuple[list[int], int]:
        """Where ids[start:end] holds the prompt's placeholders (relative to start), and how many came before start.
        Only the prompt's: a placeholder token the model generates is text, as transformers embeds it."""
        prompt = len(self.kv_prompt)
        return [index - start for index in range(start, min(end, prompt)) if ids[index] == self.token_id], \
            sum(1 for token in ids[:min(start, prompt)] if token == self.token_id)


class PicturedSpan(NamedTuple):
    """A span of a sequence with images in a packed forward: its tokens seq.all_ids[start:end] lie at packed
    positions offset.. (whether or not they hold placeholders)."""
    seq: Sequence
    offset: int
    start: int
    end: int


def image_inputs(processed: Mapping[str, Any], token_id: int) -> ImageInputs:
    """From a processor's output for one prompt (input_ids, attention_mask, and its image tensors)."""
    ids = processed["input_ids"][0].tolist()
    pixels = {name: value for name, value in processed.items()
              if name not in ("input_ids", "attention_mask", "mm_token_type_ids")}
    digest = hashlib.blake2b(digest_size=8)
    for value in pixels.values():
        digest.update(value.numpy().tobytes())
    # negative, so that no token id matches it: a prompt shares cached K/V only with prompts of the same images
    marker = -1 - int.from_bytes(digest.digest(), "little") % 2**62
    return ImageInputs(pixels, token_id, [marker if token == token_id else token for token in ids])


def image_token_id(model: PreTrainedModel) -> int | None:
    """The placeholder token of a vision-language model; None for a text model."""
    config = model.config
    return getattr(config, "image_token_id", None) if getattr(config, "vision_config", None) else None


def encode_images(model: PreTrainedModel, seqs: list[Sequence]) -> None:
    """Run the vision tower over every image of the sequences, as one batch, and keep each sequence's features
    (and, for 3-D rotary positions, its prompt's positions)."""
    for seq, features in zip(seqs, FEATURES[model.config.model_type](model, seqs)):
        seq.inputs.features = features
    if hasattr(model.model, "get_rope_index"):
        for seq in seqs:
            ids = torch.tensor([seq.prompt_ids])
            positions, delta = model.model.get_rope_index(ids, (ids == seq.inputs.token_id).int(),
                                                          image_grid_thw=seq.inputs.pixels["image_grid_thw"])
            seq.inputs.rope_positions, seq.inputs.rope_delta = positions[:, 0], int(delta)


def text_position(seq: Sequence, index: int) -> int:
    """The position of a token after the prompt (all three axes alike where positions are 3-D)."""
    return index + seq.inputs.rope_delta if isinstance(seq.inputs, ImageInputs) else index


def llava_features(model: PreTrainedModel, seqs: list[Sequence]) -> list[torch.Tensor]:
    """LLaVA: every image is one row of pixel_values (all of one size); its features, one row per placeholder."""
    config = model.config
    return per_sequence(seqs, "pixel_values", model.get_image_features(
        **concatenated(model, seqs), vision_feature_layer=config.vision_feature_layer,
        vision_feature_select_strategy=config.vision_feature_select_strategy).pooler_output)


def qwen2_vl_features(model: PreTrainedModel, seqs: list[Sequence]) -> list[torch.Tensor]:
    """Qwen2-VL: every image, at its own size, is a run of patch rows in pixel_values with its grid in
    image_grid_thw; the tower attends within each image."""
    return per_sequence(seqs, "image_grid_thw", model.get_image_features(**concatenated(model, seqs)).pooler_output)


def concatenated(model: PreTrainedModel, seqs: list[Sequence]) -> dict[str, torch.Tensor]:
    pixels = {name: torch.cat([seq.inputs.pixels[name] for seq in seqs]).to(model.device)
              for name in seqs[0].inputs.pixels}
    pixels["pixel_values"] = pixels["pixel_values"].to(model.dtype)
    return pixels


def per_sequence(seqs: list[Sequence], one_row_per_image: str, features: tuple[torch.Tensor, ...]
                 ) -> list[torch.Tensor]:
    """Per-image features gathered back into each sequence's, in prompt order."""
    images = iter(features)
    return [torch.cat([next(images) for _ in seq.inputs.pixels[one_row_per_image]]) for seq in seqs]


def idefics3_features(model: PreTrainedModel, seqs: list[Sequence]) -> list[torch.Tensor]:
    """Idefics3 and SmolVLM: a prompt's images (each split into tiles plus a global view) are one batch row; rows
    are padded with all-zero images, which the model skips."""
    pixels = {name: pad_sequence([seq.inputs.pixels[name][0] for seq in seqs], batch_first=True).to(model.device)
              for name in ("pixel_values", "pixel_attention_mask")}
    return list(model.get_image_features(**pixels).pooler_output)


FEATURES = {"llava": llava_features, "idefics3": idefics3_features, "smolvlm": idefics3_features,
            "qwen2_vl": qwen2_vl_features, "qwen2_5_vl": qwen2_vl_features}


def embed_with_images(model: PreTrainedModel, ids: torch.Tensor, pictured: list[PicturedSpan]) -> torch.Tensor:
    """Embeddings of packed ids [tokens] with image features written over the placeholders of the pictured
    spans."""
    embeddings = model.get_input_embeddings()(ids)
    for seq, offset, start, end in pictured:
        positions, before = seq.inputs.positions(seq.all_ids, start, end)
        if positions:
            rows = torch.tensor(positions, device=ids.device) + offset
            embeddings[rows] = seq.inputs.features[before:before + len(positions)].to(embeddings.dtype)
    return embeddings
