"""End to end: a server with --lora-modules on a tiny model, driven by the OpenAI SDK: requests pick adapters by
model (concurrently, so rows of different adapters share batches) and answer as PeftModel.generate does;
/v1/models lists the adapters with their base as parent; vLLM's load and unload endpoints behind the API key;
unknown adapters and adapters that do not fit are refused with the reason."""

import concurrent.futures

import httpx
import openai
import pytest

from tests.helpers.quality import save_decoder
from tests.helpers.server_process import running_server
from tests.helpers.lora import peft_tokens, save_adapter

pytestmark = pytest.mark.e2e

KEY = "lora-key"
TOKENS = 12
PROMPTS = ["The adapter says", "Once upon a time", "x = 1 + ", "Bonjour"]
SERVED = {"q-and-v": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
          "mlp": dict(r=4, lora_alpha=4, target_modules=["gate_proj", "up_proj", "down_proj"])}
LATER = {"everywhere": dict(r=8, lora_alpha=8, target_modules="all-linear", use_rslora=True),
         "too-wide": dict(r=16, lora_alpha=16, target_modules=["q_proj"])}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora-e2e")
    save_decoder(root / "base")
    folders = {None: root / "base"}
    for seed, (name, settings) in enumerate({**SERVED, **LATER}.items()):
        folders[name] = save_adapter(root / "base", root / name, seed, **settings)
    return folders


@pytest.fixture(scope="module")
def url(folders):
    modules = [f"{name}={folders[name]}" for name in SERVED]
    with running_server(str(folders[None]), "--dtype", "float32", "--lora-modules", *modules, "--max-loras", "3",
                        "--max-lora-rank", "8", "--allow-runtime-lora-updating", "--api-key", KEY) as url:
        yield url


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def http(url):
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def tokenizer(folders):
    import transformers
    return transformers.AutoTokenizer.from_pretrained(folders[None])


def complete(client, model: str, prompt: str) -> str:
    return client.completions.create(model=model, prompt=prompt, max_tokens=TOKENS, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text


def expected(folders, tokenizer, name, prompt: str) -> str:
    tokens = peft_tokens(folders, name, tokenizer(prompt)["input_ids"], TOKENS)
    return tokenizer.decode(tokens, skip_special_tokens=True)  # as the server's text shows them


def test_requests_pick_adapters_by_model_and_answer_as_peft(client, folders, tokenizer):
    requests = [(model, prompt) for prompt in PROMPTS for model in ("base", *SERVED)]
    with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
        answers = list(pool.map(lambda request: complete(client, *request), requests))
    assert answers == [expected(folders, tokenizer, None if model == "base" else model, prompt)
                       for model, prompt in requests]


def test_models_list_the_adapters_with_their_base_as_parent(http, folders):
    cards = http.get("/v1/models").json()["data"]
    assert [(c["id"], c.get("parent"), c.get("root")) for c in cards] == [
        ("base", None, None), *((name, "base", str(folders[name])) for name in SERVED)]
    assert http.get("/v1/models/mlp").json()["parent"] == "base"


def test_an_unknown_model_is_a_404_listing_every_name(client):
    with pytest.raises(openai.NotFoundError) as missing:
        complete(client, "nope", "hi")
    error = missing.value.body
    assert error["code"] == "model_not_found" and error["param"] == "model"
    assert all(name in error["message"] for name in ("base", *SERVED))


def test_adapters_load_and_unload_at_run_time_behind_the_key(http, client, folders, tokenizer, url):
    body = {"lora_name": "everywhere", "lora_path": str(folders["everywhere"])}
    assert httpx.post(f"{url}/v1/load_lora_adapter", json=body).status_code == 401
    loaded = http.post("/v1/load_lora_adapter", json=body)
    assert loaded.status_code == 200 and loaded.text == "Success: LoRA adapter 'everywhere' added successfully."
    assert complete(client, "everywhere", PROMPTS[0]) == expected(folders, tokenizer, "everywhere", PROMPTS[0])

    again = http.post("/v1/load_lora_adapter", json=body)
    assert again.status_code == 400 and "already loaded" in again.json()["error"]["message"]
    full = http.post("/v1/load_lora_adapter", json={"lora_name": "four", "lora_path": str(folders["q-and-v"])})
    assert full.status_code == 400
    assert "at most 3 LoRA adapters (--max-loras) and 3 are loaded" in full.json()["error"]["message"]

    unloaded = http.post("/v1/unload_lora_adapter", json={"lora_name": "everywhere"})
    assert unloaded.status_code == 200 and unloaded.text == "Success: LoRA adapter 'everywhere' removed successfully."
    with pytest.raises(openai.NotFoundError):
        complete(client, "everywhere", PROMPTS[0])
    gone = http.post("/v1/unload_lora_adapter", json={"lora_name": "everywhere"})
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "model_not_found"


@pytest.mark.parametrize("name, path, reason", [
    ("too-wide", "too-wide", "has rank 16, more than this server's --max-lora-rank 8"),
    ("nowhere", None, "adapter_config.json not found"),
    ("base", "mlp", "is the base model's name"),
])
def test_adapters_that_do_not_fit_are_a_400_with_the_reason(http, folders, name, path, reason):
    folder = folders[path] if path else folders[None] / "missing"
    refused = http.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(folder)})
    assert refused.status_code == 400 and reason in refused.json()["error"]["message"]
    assert name not in [card["id"] for card in http.get("/v1/models").json()["data"]] or name == "base"
