"""Vision-language chat on the engine, on a tiny random LLaVA and a tiny Idefics3 (SmolVLM): every request's
greedy tokens equal transformers' own `generate` on the processor's inputs, with images and text-only rows batched
together and prompts cut into chunks through their images; the vision tower runs once per step for all new images;
the prefix cache never serves one image's K/V to another."""

import asyncio

import numpy as np
import pytest
import transformers
from PIL import Image

from tests.helpers.engine import finish, greedy, make_engine, run_with_engine
from tests.helpers.tiny_models import tiny_vision_model

from batching import SamplingParams
from batching.vision import image_inputs
from config import Config
from model_manager import ModelLoadError, load_model


@pytest.fixture(scope="module", params=["llava", "idefics3", "smolvlm", "qwen2_vl", "qwen2_5_vl"])
def vision(request):
    """(model on the engine's attention, the same weights on sdpa for generate, processor)"""
    model, processor = tiny_vision_model(request.param, seed=1)
    reference, _ = tiny_vision_model(request.param, seed=1, attention="sdpa")
    return model, reference, processor


def vision_tower(model):
    return next(getattr(model.model, name) for name in ("vision_tower", "vision_model", "visual")
                if hasattr(model.model, name))


def image_count(inputs) -> int:
    """How many rows the vision tower sees: images (an Idefics3 image's tiles and global view each count), or
    Qwen2-VL's patches (a [patches, values] tensor)."""
    pixels = inputs["pixel_values"]
    return len(pixels) if pixels.dim() == 2 else len(pixels.flatten(0, -4))


def picture(seed: int) -> Image.Image:
    return Image.fromarray((np.random.RandomState(seed).rand(40, 50, 3) * 255).astype("uint8"))


def processed(processor, question: str, images: list[Image.Image]):
    content = [*({"type": "image"} for _ in images), {"type": "text", "text": question}]
    text = processor.tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                                   chat_template=processor.chat_template, tokenize=False)
    return processor(text=text, images=images or None, return_tensors="pt")


def add(engine, model, inputs, tokens: int = 16, count: int = 1):
    images = image_inputs(inputs, model.config.image_token_id) if "pixel_values" in inputs else None
    return engine.add_siblings(inputs["input_ids"][0].tolist(), greedy(tokens, min_tokens=tokens), count,
                               inputs=images)


def generated(reference, inputs, tokens: int = 16) -> list[int]:
    output = reference.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
    return output[0, inputs["input_ids"].shape[1]:].tolist()


def serve(model, processor, requests, **settings):
    async def body(engine):
        seqs = [add(engine, model, inputs)[0] for inputs in requests]
        done = await asyncio.gather(*(finish(engine, seq) for seq in seqs))
        return [seq.output_ids for seq in done], [seq.cached_tokens for seq in done]
    return run_with_engine(lambda: make_engine(model, processor.tokenizer, **settings), body)


@pytest.mark.parametrize("static_cache", [False, True])
def test_images_and_text_rows_batched_decode_as_generate_does(vision, static_cache):
    """Batch-invariant mode cuts prompts at 32 tokens, so the placeholders of an image can straddle a cut; with
    the static cache, decoding rows take the static step (Qwen2-VL's positions there are shifted by its images)."""
    model, reference, processor = vision
    requests = [processed(processor, "What is this?", [picture(0)]),
                processed(processor, "Describe it.", []),
                processed(processor, "Compare these two pictures, please.", [picture(1), picture(2)]),
                processed(processor, "Say something.", [])]
    outputs, _ = serve(model, processor, requests, static_cache=static_cache, static_cache_decoder_max_length=1024)
    assert len({tuple(output) for output in outputs}) == len(outputs)
    for inputs, output in zip(requests, outputs):
        assert output == generated(reference, inputs)


def test_new_images_are_encoded_together_in_one_vision_pass(vision):
    model, reference, processor = vision
    requests = [processed(processor, "What is this?", [picture(seed)]) for seed in range(3)]
    batches = []
    hook = vision_tower(model).register_forward_hook(
        lambda module, args, kwargs, output: batches.append(len(kwargs.get("pixel_values", args and args[0]))),
        with_kwargs=True)
    try:
        outputs, _ = serve(model, processor, requests, batch_invariant=False, max_num_batched_tokens=4096)
    finally:
        hook.remove()
    assert batches == [sum(image_count(inputs) for inputs in requests)]
    assert outputs == [generated(reference, inputs) for inputs in requests]


def test_the_prefix_cache_tells_images_apart(vision):
    """The same text with another image must not reuse the first image's K/V; the same image may."""
    model, reference, processor = vision
    first, other = (processed(processor, "What is this? Answer in detail, please.", [picture(seed)])
                    for seed in (5, 6))

    async def body(engine):
        results = []
        for inputs in (first, other, first):
            seq = await finish(engine, add(engine, model, inputs)[0])
            results.append((seq.output_ids, seq.cached_tokens))
        return results

    (a, cached_a), (b, cached_b), (again, cached_again) = run_with_engine(
        lambda: make_engine(model, processor.tokenizer, batch_invariant=False), body)
    assert a == generated(reference, first) and b == generated(reference, other) and a != b
    placeholder = first["input_ids"][0].tolist().index(model.config.image_token_id)
    assert cached_a == 0 and cached_b <= placeholder  # at most the text before the image
    assert again == a and cached_again > placeholder


def test_siblings_share_one_vision_pass(vision):
    model, reference, processor = vision
    inputs = processed(processor, "What is this?", [picture(9)])
    calls = []
    hook = vision_tower(model).register_forward_hook(lambda *_: calls.append(1))

    async def body(engine):
        return [(await finish(engine, seq)).output_ids for seq in add(engine, model, inputs, count=3)]

    try:
        outputs = run_with_engine(lambda: make_engine(model, processor.tokenizer), body)
    finally:
        hook.remove()
    assert outputs == [generated(reference, inputs)] * 3 and len(calls) == 1


def test_a_placeholder_the_model_generates_is_text(vision):
    """Only the prompt's placeholders stand for images: a placeholder token the model generates is embedded as the
    token it is, as transformers does (the engine wrote image features over it and failed once they ran out)."""
    model, reference, processor = vision
    inputs, image = processed(processor, "What is this?", [picture(3)]), model.config.image_token_id
    params = SamplingParams(max_tokens=4, temperature=0.0, logit_bias=((image, 100.0),), logprobs=0)

    async def body(engine):
        seq = engine.add(inputs["input_ids"][0].tolist(), params, inputs=image_inputs(inputs, image))
        return [token.logprob async for delta in engine.stream(seq) for token in delta.logprobs], seq.output_ids

    logprobs, tokens = run_with_engine(lambda: make_engine(model, processor.tokenizer), body)
    expected = reference.generate(**inputs, max_new_tokens=4, do_sample=False, sequence_bias={(image,): 100.0},
                                  output_logits=True, return_dict_in_generate=True)
    assert tokens == expected.sequences[0, inputs["input_ids"].shape[1]:].tolist() == [image] * 4
    reference_logprobs = [step[0].float().log_softmax(dim=-1)[image].item() for step in expected.logits]
    assert logprobs == pytest.approx(reference_logprobs, abs=1e-4)


def test_an_unserved_vision_family_is_refused_before_its_processor_loads(tmp_path):
    """Gemma 3 attends both ways over an image's tokens, which the engine's causal attention does not: the server
    says so at start."""
    transformers.Gemma3Config().save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="'gemma3' are not served; these are: llava, idefics3, smolvlm, qwen2_vl"):
        load_model(Config(hf_model=str(tmp_path), model_type="AutoModelForImageTextToText"))
