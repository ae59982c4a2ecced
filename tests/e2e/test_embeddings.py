"""/v1/embeddings over HTTP with the real openai SDK (which asks for base64 and decodes it): main.py
--serving-type embedding serving the embedded all-MiniLM-L6-v2, its vectors those of sentence-transformers; texts,
lists, token ids, float and base64; concurrent requests sharing forwards; a Matryoshka-trained folder shortened by
`dimensions`; the 400s: dimensions on a model not trained for it, too long or empty inputs; a chat server's
embeddings from its decoder; /rerank by an embedding model's cosine and by a cross-encoder."""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import torch
import torch.nn.functional as F
import transformers
from sentence_transformers import CrossEncoder, SentenceTransformer

from config import Config
from converters.embedded_embedder import embedded_embedder_folder
from tests.helpers.server_process import running_server
from tests.unit.test_embeddings import save_cross_encoder

pytestmark = pytest.mark.e2e

MODEL = "all-MiniLM-L6-v2"
TEXTS = ["The cat sits on the mat.", "Embeddings turn text into vectors.", "short",
         "A considerably longer sentence, so that the forward pads the shorter inputs beside it to its length."]


@pytest.fixture(scope="module")
def embedded_folder() -> Path:
    return embedded_embedder_folder(Path(Config().model_cache_dir))


@pytest.fixture(scope="module")
def reference(embedded_folder) -> SentenceTransformer:
    return SentenceTransformer(str(embedded_folder), device="cpu")


@pytest.fixture(scope="module")
def embedding_url():
    with running_server("--serving-type", "embedding", "--continuous-batching-batch-size", "8") as url:
        yield url


@pytest.fixture(scope="module")
def embedder(embedding_url) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{embedding_url}/v1", api_key="-", max_retries=0)


def vectors(response) -> np.ndarray:
    assert [item.index for item in response.data] == list(range(len(response.data)))
    return np.array([item.embedding for item in response.data])


def test_texts_match_sentence_transformers_through_the_sdks_base64(embedder, reference):
    response = embedder.embeddings.create(model=MODEL, input=TEXTS)  # the SDK asks for base64 and decodes it
    np.testing.assert_allclose(vectors(response), reference.encode(TEXTS), atol=1e-5, rtol=0)
    tokens = sum(len(ids) for ids in reference.tokenizer(TEXTS).input_ids)
    assert (response.usage.prompt_tokens, response.usage.total_tokens) == (tokens, tokens)
    assert response.model == MODEL and response.object == "list" and response.data[0].object == "embedding"


def test_one_text_floats_and_token_ids_give_the_same_vector(embedder, reference):
    expected = reference.encode(TEXTS[:1])
    alone = embedder.embeddings.create(model=MODEL, input=TEXTS[0], encoding_format="float")
    np.testing.assert_allclose(vectors(alone), expected, atol=1e-5, rtol=0)
    ids = reference.tokenizer(TEXTS[0]).input_ids  # token ids are the whole input: [CLS] ... [SEP] included
    np.testing.assert_allclose(vectors(embedder.embeddings.create(model=MODEL, input=ids)), expected, atol=1e-5,
                               rtol=0)
    twice = embedder.embeddings.create(model=MODEL, input=[ids, ids])
    np.testing.assert_allclose(vectors(twice), np.repeat(expected, 2, axis=0), atol=1e-5, rtol=0)


def test_raw_base64_is_little_endian_float32(embedding_url, reference):
    body = httpx.post(f"{embedding_url}/v1/embeddings", json={"model": MODEL, "input": "short",
                                                                "encoding_format": "base64"}).json()
    vector = np.frombuffer(base64.b64decode(body["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_allclose(vector, reference.encode(["short"])[0], atol=1e-5, rtol=0)


def test_concurrent_requests_share_forwards(embedding_url, reference):
    texts = [f"request number {i} asks for the vector of a sentence of {i % 7 + 1} extra words" + " word" * (i % 7)
             for i in range(32)]
    steps_before = httpx.get(f"{embedding_url}/health").json()["steps"]

    async def embed_all() -> list:
        client = openai.AsyncOpenAI(base_url=f"{embedding_url}/v1", api_key="-", max_retries=0)
        return await asyncio.gather(*(client.embeddings.create(model=MODEL, input=text) for text in texts))

    responses = asyncio.run(embed_all())
    steps = httpx.get(f"{embedding_url}/health").json()["steps"] - steps_before
    np.testing.assert_allclose(np.concatenate([vectors(r) for r in responses]), reference.encode(texts), atol=1e-5,
                               rtol=0)
    assert 4 <= steps < 32, f"32 requests in {steps} forwards of at most 8"


def test_models_lists_the_embedding_model_with_its_longest_input(embedder):
    assert [(model.id, model.max_model_len) for model in embedder.models.list().data] == [(MODEL, 256)]


@pytest.mark.parametrize("body, param, words", [
    ({"input": "x", "dimensions": 64}, "dimensions", ["not trained", "384"]),
    ({"input": ["fine", "word " * 300]}, "input", ["256 tokens", "input 1 has 302 tokens"]),
    ({"input": ""}, "input", ["empty"]),
    ({"input": []}, "input", ["empty"]),
    ({"input": ["a", ""]}, "input", ["input 1 is empty"]),
    ({"input": [5, 10**9]}, "input", ["outside the vocabulary"]),
    ({"input": "x", "encoding_format": "int8"}, "encoding_format", []),
])
def test_bad_requests_get_400s_that_say_why(embedding_url, body, param, words):
    response = httpx.post(f"{embedding_url}/v1/embeddings", json={"model": MODEL, **body})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert all(word in error["message"] for word in words), error["message"]


def test_an_unknown_model_is_a_404(embedder):
    with pytest.raises(openai.NotFoundError):
        embedder.embeddings.create(model="text-embedding-3-small", input="x")


def test_a_chat_server_embeds_with_its_decoders_last_hidden_state(client, embedded_model_dir):
    """The embedded SmolLM2 (the shared chat server): its prompt's last token's final hidden state, normalised."""
    texts = ["The capital of France is Paris.", "short"]
    model = client.models.list().data[0].id
    response = client.embeddings.create(model=model, input=texts)
    reference = transformers.AutoModel.from_pretrained(embedded_model_dir, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(embedded_model_dir)
    with torch.inference_mode():
        expected = [F.normalize(reference(torch.tensor([ids])).last_hidden_state[0, -1], dim=-1).numpy()
                    for ids in tokenizer(texts).input_ids]
    np.testing.assert_allclose(vectors(response), np.stack(expected), atol=1e-5, rtol=0)
    assert response.usage.prompt_tokens == sum(len(ids) for ids in tokenizer(texts).input_ids)


@pytest.fixture(scope="module")
def matryoshka_folder(tmp_path_factory, embedded_folder) -> Path:
    """A tiny random BERT whose config says it was trained for 32 and 64 of its 64 dimensions (vLLM's flag), mean
    pooled and normalised."""
    folder = tmp_path_factory.mktemp("matryoshka")
    tokenizer = transformers.AutoTokenizer.from_pretrained(embedded_folder)
    config = transformers.BertConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=128, max_position_embeddings=64,
                                     matryoshka_dimensions=[32, 64])
    transformers.BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]))
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True}))
    return folder


def test_a_matryoshka_model_is_shortened_and_renormalised(matryoshka_folder):
    # no --serving-type: a sentence-transformers folder is served as embeddings
    with running_server(str(matryoshka_folder), "--served-model-name", "tiny") as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="-", max_retries=0)
        full = vectors(client.embeddings.create(model="tiny", input=TEXTS))
        short = vectors(client.embeddings.create(model="tiny", input=TEXTS, dimensions=32))
        for dimensions in (48, 65):
            with pytest.raises(openai.BadRequestError) as raised:
                client.embeddings.create(model="tiny", input="x", dimensions=dimensions)
            assert raised.value.body["param"] == "dimensions"
        root = httpx.get(url, headers={"accept": "application/json"}).json()
    expected = full[:, :32] / np.linalg.norm(full[:, :32], axis=1, keepdims=True)
    np.testing.assert_allclose(short, expected, atol=1e-6, rtol=0)
    assert not np.allclose(short, full[:, :32], atol=1e-3)
    assert root["serving_type"] == "embedding" and "/v1/embeddings" in root["endpoints"]


DOCUMENTS = ["Paris is the capital and largest city of France.", "Cats sleep for most of the day.",
             "The Eiffel Tower stands in Paris.", "Bananas are rich in potassium."]
QUERY = "Which city is the capital of France?"


@pytest.mark.parametrize("path", ["/v1/rerank", "/rerank"])
def test_rerank_with_an_embedding_model_orders_documents_by_cosine(embedding_url, reference, path):
    body = httpx.post(f"{embedding_url}{path}", json={"model": MODEL, "query": QUERY, "documents": DOCUMENTS}).json()
    query, *documents = reference.encode([QUERY, *DOCUMENTS])
    expected = documents @ query  # unit vectors
    assert [result["index"] for result in body["results"]] == list(np.argsort(-expected))
    np.testing.assert_allclose([r["relevance_score"] for r in body["results"]], np.sort(expected)[::-1], atol=1e-5)
    assert [r["document"]["text"] for r in body["results"]] == [DOCUMENTS[r["index"]] for r in body["results"]]
    tokens = sum(len(ids) for ids in reference.tokenizer([QUERY, *DOCUMENTS]).input_ids)
    assert body["model"] == MODEL and body["usage"] == {"total_tokens": tokens}


def test_rerank_top_n_and_without_documents(embedding_url):
    body = httpx.post(f"{embedding_url}/v1/rerank", json={"model": MODEL, "query": QUERY, "documents": DOCUMENTS,
                                                           "top_n": 2, "return_documents": False}).json()
    assert len(body["results"]) == 2 and all(set(result) == {"index", "relevance_score"} for result in body["results"])
    assert body["results"][0]["index"] == 0


@pytest.mark.parametrize("body, param", [({"query": "q", "documents": []}, "documents"),
                                         ({"query": "", "documents": ["d"]}, "query"),
                                         ({"query": "q", "documents": ["d", "word " * 300]}, "documents"),
                                         ({"query": "word " * 300, "documents": ["d"]}, "query")])
def test_bad_rerank_requests_get_400s(embedding_url, body, param):
    response = httpx.post(f"{embedding_url}/rerank", json={"model": MODEL, **body})
    assert response.status_code == 400 and response.json()["error"]["param"].startswith(param), response.text


def test_a_cross_encoder_reranks_as_sentence_transformers(tmp_path, embedded_folder):
    """A tiny random BERT cross-encoder folder served (its architecture says it scores pairs): the scores of
    CrossEncoder.predict, best first; it embeds nothing."""
    folder = save_cross_encoder(tmp_path)
    with running_server("--serving-type", "embedding", "--hf-model", str(folder), "--served-model-name", "ce") as url:
        body = httpx.post(f"{url}/v1/rerank", json={"model": "ce", "query": QUERY, "documents": DOCUMENTS}).json()
        embeddings = httpx.post(f"{url}/v1/embeddings", json={"model": "ce", "input": "x"})
    expected = CrossEncoder(str(folder), device="cpu").predict([(QUERY, document) for document in DOCUMENTS])
    assert [result["index"] for result in body["results"]] == list(np.argsort(-expected))
    np.testing.assert_allclose([r["relevance_score"] for r in body["results"]], np.sort(expected)[::-1], atol=1e-5)
    assert embeddings.status_code == 400 and "cross-encoder" in embeddings.json()["error"]["message"]
