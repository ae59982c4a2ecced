"""Vision-language chat over HTTP with the real openai SDK: a tiny random LLaVA saved to a folder and served by
main.py. Images as data: URLs, from a real HTTP server on loopback and from the allowed local folder give
transformers' `generate` answer; every kind of bad image gets a 400 naming its message part."""

import base64
import io
import threading
from functools import partial
from http.server import HTTPServer, SimpleHTTPRequestHandler

import numpy as np
import openai
import pytest
import transformers
from PIL import Image

from tests.helpers.server_process import running_server
from tests.helpers.tiny_models import save_vision_processor, tiny_vision_model

pytestmark = pytest.mark.e2e

QUESTION = "What is in this picture?"


def picture_png(seed: int, width: int = 40, height: int = 50) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray((np.random.RandomState(seed).rand(height, width, 3) * 255).astype("uint8")).save(buffer, "PNG")
    return buffer.getvalue()


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """A folder of pictures, also served over HTTP on loopback: (folder, base URL)."""
    folder = tmp_path_factory.mktemp("media")
    for seed in range(2):
        (folder / f"picture{seed}.png").write_bytes(picture_png(seed))
    server = HTTPServer(("127.0.0.1", 0), partial(SimpleHTTPRequestHandler, directory=str(folder)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield folder, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture(scope="module")
def served(tokenizer, media, tmp_path_factory):
    """(client, reference model on sdpa, processor)"""
    folder = tmp_path_factory.mktemp("llava")
    text = transformers.AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    text.chat_template = None  # the template is the processor's, as LLaVA models ship it
    model, processor = tiny_vision_model("llava", seed=4, attention="sdpa", tokenizer=text)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    with running_server("--hf-model", str(folder), "--model-type", "AutoModelForImageTextToText",
                        "--served-model-name", "vision", "--allowed-local-media-path", str(media[0]),
                        "--max-image-pixels", "100000", "--max-image-mb", "0.2") as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="-", max_retries=0), model, processor


def processed(processor, pngs: list[bytes]):
    content = [*({"type": "image"} for _ in pngs), {"type": "text", "text": QUESTION}]
    text = processor.tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                                   chat_template=processor.chat_template, tokenize=False)
    images = [Image.open(io.BytesIO(data)).convert("RGB") for data in pngs]
    return processor(text=text, images=images or None, return_tensors="pt")


def expected(model, processor, pngs: list[bytes], max_tokens: int) -> str:
    inputs = processed(processor, pngs)
    output = model.generate(**inputs, max_new_tokens=max_tokens, do_sample=False)
    return processor.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def ask(client, *parts: dict, **settings):
    return client.chat.completions.create(model="vision", temperature=0, max_tokens=10, messages=[
        {"role": "user", "content": [*parts, {"type": "text", "text": QUESTION}]}], **settings)


def test_an_image_is_answered_as_generate_answers_it_wherever_it_comes_from(served, media):
    client, model, processor = served
    folder, web = media
    answer = expected(model, processor, [picture_png(0)], 10)
    for url in (data_url(picture_png(0)), f"{web}/picture0.png", str(folder / "picture0.png")):
        response = ask(client, image_part(url))
        assert response.choices[0].message.content == answer, url
    assert response.usage.prompt_tokens > 16  # the image's 16 placeholders and the text


def test_two_images_stream_and_text_only_chats_work_beside_them(served, media):
    client, model, processor = served
    folder, web = media
    pngs = [picture_png(0), picture_png(1)]
    chunks = list(ask(client, image_part(data_url(pngs[0])), image_part(f"{web}/picture1.png"), stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected(model, processor,
                                                                                              pngs, 10)
    plain = client.chat.completions.create(model="vision", max_tokens=10, temperature=0,
                                           messages=[{"role": "user", "content": QUESTION}])
    assert plain.choices[0].message.content == expected(model, processor, [], 10)


def test_the_responses_api_takes_input_images(served):
    client, model, processor = served
    response = client.responses.create(model="vision", temperature=0, max_output_tokens=10, input=[
        {"role": "user", "content": [{"type": "input_image", "image_url": data_url(picture_png(1))},
                                     {"type": "input_text", "text": QUESTION}]}])
    assert response.output_text == expected(model, processor, [picture_png(1)], 10)


@pytest.mark.parametrize("url, reason", [
    (data_url(b"plain text"), "not an image"),
    (data_url(picture_png(3)[:300]), "corrupt"),
    (data_url(picture_png(3, width=400, height=400)), "--max-image-mb"),
    (data_url(picture_png(3, width=300, height=400)[:8] + b"x"), "not an image"),
    ("/etc/hostname", "--allowed-local-media-path"),
    ("http://127.0.0.1:9/none.png", "could not be fetched"),
])
def test_bad_images_get_a_400_naming_the_part(served, url, reason):
    client, _, _ = served
    with pytest.raises(openai.BadRequestError) as error:
        ask(client, {"type": "text", "text": "Look:"}, image_part(url))
    assert error.value.body["param"] == "messages[0].content[1]"
    assert reason in error.value.body["message"]


def test_too_many_pixels_is_refused_before_decoding(served):
    client, _, _ = served
    buffer = io.BytesIO()
    Image.new("RGB", (400, 300)).save(buffer, "PNG")  # compresses to a few hundred bytes: only pixels are too many
    with pytest.raises(openai.BadRequestError) as error:
        ask(client, image_part(data_url(buffer.getvalue())))
    assert "120000 pixels" in error.value.body["message"]


@pytest.mark.parametrize("family", ["idefics3", "smolvlm", "qwen2_vl"])
def test_smolvlm_and_qwen2_vl_shaped_models_answer_as_generate_does(tokenizer, tmp_path, family):
    """Over SmolLM2's vocabulary: Idefics3 (SmolVLM's architecture) and SmolVLM2's turn each image into tiles plus
    a global view, each with its own placeholders; Qwen2-VL gives each image placeholders by its size and 3-D
    rotary positions. SmolVLM2's and Qwen2-VL's processors are built without torchvision (which their video
    processors need)."""
    text = transformers.AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    text.chat_template = None
    model, processor = tiny_vision_model(family, seed=5, attention="sdpa", tokenizer=text)
    model.save_pretrained(tmp_path)
    save_vision_processor(processor, tmp_path)
    with running_server("--hf-model", str(tmp_path), "--model-type", "AutoModelForImageTextToText",
                        "--served-model-name", "vision") as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="-", max_retries=0)
        pngs = [picture_png(0), picture_png(1, width=30, height=20)]
        response = ask(client, *(image_part(data_url(png)) for png in pngs))
    assert response.choices[0].message.content == expected(model, processor, pngs, 10)
    assert response.usage.prompt_tokens == processed(processor, pngs)["input_ids"].shape[1]
