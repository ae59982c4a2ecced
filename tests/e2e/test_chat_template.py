"""End to end: --chat-template, a request's chat_template_kwargs, and the model's generation_config.json as the
defaults of the sampling fields a request leaves unset (--generation-config auto, --override-generation-config),
on a copy of the embedded model's folder."""

import json

import httpx
import openai
import pytest
import transformers

from tests.helpers.server_process import running_server

pytestmark = pytest.mark.e2e

TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% if persona %}({{ persona }}) {% endif %}"
            "{% endif %}")
MESSAGES = [{"role": "user", "content": "Tell me about the sea."}]
PIRATE = {"persona": "a pirate"}


@pytest.fixture(scope="module")
def model_folder(embedded_model_dir, tmp_path_factory):
    """The embedded model whose authors chose top_k 1, temperature 0.7, top_p 0.9 and 50 new tokens at most."""
    folder = tmp_path_factory.mktemp("generation-defaults")
    for path in embedded_model_dir.iterdir():
        if path.name != "generation_config.json":
            (folder / path.name).symlink_to(path)
    generation = json.loads((embedded_model_dir / "generation_config.json").read_text())
    authors = {"top_k": 1, "temperature": 0.7, "top_p": 0.9, "max_new_tokens": 50}
    (folder / "generation_config.json").write_text(json.dumps({**generation, **authors}))
    return folder


@pytest.fixture(scope="module")
def url(model_folder, tmp_path_factory):
    template = tmp_path_factory.mktemp("template") / "chat.jinja"
    template.write_text(TEMPLATE)
    with running_server("--hf-model", str(model_folder), "--served-model-name", "m", "--torch-dtype", "float32",
                        "--chat-template", str(template), "--override-generation-config",
                        '{"max_new_tokens": 5}') as base_url:
        yield base_url


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="-", max_retries=0)


def template_ids(model_folder, chat_template: str | None = TEMPLATE, **variables) -> list[int]:
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_folder)
    text = tokenizer.apply_chat_template(MESSAGES, chat_template=chat_template, add_generation_prompt=True,
                                         tokenize=False, **variables)
    return tokenizer(text, add_special_tokens=False).input_ids


def test_the_given_template_and_the_requests_variables_render_the_prompt(url, client, model_folder):
    tokenized = httpx.post(f"{url}/tokenize", json={"messages": MESSAGES, "chat_template_kwargs": PIRATE}).json()
    assert tokenized["tokens"] == template_ids(model_folder, **PIRATE)
    assert template_ids(model_folder, **PIRATE) != template_ids(model_folder)
    assert template_ids(model_folder) != template_ids(model_folder, chat_template=None)  # not the model's own
    plain = client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=1)
    assert plain.usage.prompt_tokens == len(template_ids(model_folder))
    pirate = client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=1,
                                            extra_body={"chat_template_kwargs": PIRATE})
    assert pirate.usage.prompt_tokens == len(tokenized["tokens"])


def test_a_variable_the_server_sets_itself_is_a_400(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=1,
                                       extra_body={"chat_template_kwargs": {"add_generation_prompt": False}})
    assert caught.value.body["param"].startswith("chat_template_kwargs")
    assert "set by the server" in caught.value.body["message"]


def test_the_models_defaults_fill_the_fields_a_request_leaves_unset(client):
    # top_k 1 from generation_config.json: any seed samples the same tokens; max_new_tokens 5 from the override
    replies = [client.chat.completions.create(model="m", messages=MESSAGES, seed=seed, extra_body={"ignore_eos": True})
               for seed in range(3)]
    assert {reply.choices[0].message.content for reply in replies} == {replies[0].choices[0].message.content}
    assert {(reply.usage.completion_tokens, reply.choices[0].finish_reason) for reply in replies} == {(5, "length")}


def test_what_a_request_gives_wins_over_the_models_defaults(client):
    replies = [client.chat.completions.create(model="m", messages=MESSAGES, seed=seed, max_tokens=12, temperature=1.5,
                                              extra_body={"top_k": -1, "ignore_eos": True}) for seed in range(4)]
    assert {reply.usage.completion_tokens for reply in replies} == {12}
    assert len({reply.choices[0].message.content for reply in replies}) > 1
    # completions keep OpenAI's default of 16 tokens: the model's limit is for requests that give none
    completion = client.completions.create(model="m", prompt="The sea", extra_body={"ignore_eos": True})
    assert completion.usage.completion_tokens == 16


def test_a_response_reports_the_sampling_values_it_was_sampled_with(client):
    defaulted = client.responses.create(model="m", input="Hello", max_output_tokens=2)
    assert (defaulted.temperature, defaulted.top_p) == (0.7, 0.9)
    given = client.responses.create(model="m", input="Hello", max_output_tokens=2, temperature=0.2, top_p=1.0)
    assert (given.temperature, given.top_p) == (0.2, 1.0)
