"""Embeddings from the engine's pooling runner against sentence-transformers' own `encode` on the same folder: the
embedded all-MiniLM-L6-v2 (float32 to 1e-5, bfloat16 by cosine), and tiny random models saved as
sentence-transformers folders for every pooling mode, an encoder's and a decoder's; inputs of different lengths
share forwards, so padding is exercised; a cross-encoder's scores against CrossEncoder.predict; a chat engine's
embeddings beside generating rows. Also: how folders are read, and cancelled requests leaving the queue."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from sentence_transformers import CrossEncoder, SentenceTransformer

from batching import Engine
from batching.pooling import TokenTypes
from config import Config
from converters.embedded_embedder import embedded_embedder_folder
from model_manager import ModelLoadError, build_embedding_engine, load_embedder, sentence_transformers_settings
from serving.embeddings import POOLED
from tests.helpers.engine import finish, generate_all, greedy, make_engine, run_with_engine
from tests.helpers.tiny_models import byte_tokenizer, tiny_model
from tests.unit.test_engine import random_prompts

TEXTS = ["Hello world.", "The quick brown fox jumps over the lazy dog, twice, and then sleeps in the warm sun.",
         "Embeddings", "A cat.", "Batchwise serves many requests in one forward; padding must not change a vector.",
         "short", "Paris is the capital of France and its largest city, on the Seine.", "ok", "two words",
         "Sentence embeddings map text to vectors whose cosine says how alike two texts are."]


@pytest.fixture(scope="module")
def embedded_folder() -> Path:
    return embedded_embedder_folder(Path(Config().model_cache_dir))


def engine_vectors(config: Config, texts: list[str]) -> tuple[np.ndarray, int]:
    """The texts' embeddings from the engine as the server builds it (all queued at once), and its steps."""
    loaded = load_embedder(config)
    prompts = loaded.tokenizer(texts).input_ids

    async def embed(engine: Engine) -> tuple[np.ndarray, int]:
        seqs = [engine.add(prompt, POOLED) for prompt in prompts]
        vectors = []
        for seq in seqs:
            async for delta in engine.stream(seq):
                vectors.append(delta.embedding)
        return np.stack(vectors), engine.steps

    return run_with_engine(lambda: build_embedding_engine(loaded, config), embed)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_embedded_model_matches_sentence_transformers_in_float32(embedded_folder):
    config = Config(serving_type="embedding", torch_dtype="float32", continuous_batching_batch_size=4)
    vectors, steps = engine_vectors(config, TEXTS)
    expected = SentenceTransformer(str(embedded_folder), device="cpu").encode(TEXTS, batch_size=32)
    assert vectors.shape == expected.shape == (len(TEXTS), 384)
    np.testing.assert_allclose(vectors, expected, atol=1e-5, rtol=0)
    assert steps == 3, "10 inputs, 4 per forward"
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-6)  # its Normalize module


def test_embedded_model_in_bfloat16_stays_close_to_sentence_transformers(embedded_folder):
    vectors, _ = engine_vectors(Config(serving_type="embedding", torch_dtype="bfloat16"), TEXTS)
    reference = SentenceTransformer(str(embedded_folder), device="cpu", model_kwargs={"dtype": torch.bfloat16})
    expected = reference.encode(TEXTS, batch_size=32, convert_to_tensor=True).float().numpy()
    # measured: 0.999997 at worst (bfloat16 against float32 is 0.99984); the next text's vector is below 0.3
    assert cosines(vectors, expected).min() > 0.9999
    assert cosines(vectors, np.roll(expected, 1, axis=0)).max() < 0.9


def save_sentence_transformers_folder(folder: Path, kind: str, pooling: str, normalize: bool) -> Path:
    """A tiny random encoder (BERT, the embedded model's vocabulary) or decoder (Llama, bytes) saved as
    sentence-transformers saves a model: weights and tokenizer, modules.json, the Pooling module's config."""
    torch.manual_seed(0)
    if kind == "bert":
        tokenizer = transformers.AutoTokenizer.from_pretrained(embedded_embedder_folder(Path(Config().model_cache_dir)))
        config = transformers.BertConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, intermediate_size=128, max_position_embeddings=128)
    else:
        tokenizer = byte_tokenizer(eos_token="<eos>", pad_token="<pad>")
        config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
                                          max_position_embeddings=128, architectures=["LlamaForCausalLM"])
    transformers.AutoModel.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    (folder / "modules.json").write_text(json.dumps(modules))
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 64,
                                                                   f"pooling_mode_{pooling}": True}))
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 100}))
    return folder


@pytest.mark.parametrize("kind, pooling, normalize", [
    ("bert", "cls_token", True), ("bert", "mean_tokens", False), ("bert", "max_tokens", True),
    ("llama", "lasttoken", True), ("llama", "mean_tokens", True)])
def test_pooling_modes_match_sentence_transformers(tmp_path, kind, pooling, normalize):
    folder = save_sentence_transformers_folder(tmp_path, kind, pooling, normalize)
    config = Config(hf_model=str(folder), torch_dtype="float32", continuous_batching_batch_size=3)
    assert config.serving_type == "embedding", "a sentence-transformers folder is served as embeddings"
    vectors, _ = engine_vectors(config, TEXTS)
    expected = SentenceTransformer(str(folder), device="cpu").encode(TEXTS, batch_size=32)
    np.testing.assert_allclose(vectors, expected, atol=1e-5, rtol=0)
    assert load_embedder(config).max_length == 100


def test_folders_without_sentence_transformers_config_pool_as_vllm_does(tmp_path):
    assert sentence_transformers_settings(tmp_path, decoder=False)[0].mode == "cls"
    assert sentence_transformers_settings(tmp_path, decoder=True)[0].mode == "lasttoken"


def test_modules_and_pooling_this_server_cannot_apply_are_refused(tmp_path):
    folder = save_sentence_transformers_folder(tmp_path, "bert", "mean_tokens", True)
    pooling = folder / "1_Pooling" / "config.json"
    pooling.write_text(json.dumps({"pooling_mode": ["cls", "mean"]}))
    with pytest.raises(ModelLoadError, match="pooling"):
        sentence_transformers_settings(folder, decoder=False)
    pooling.write_text(json.dumps({"pooling_mode": "weightedmean"}))
    with pytest.raises(ModelLoadError, match="weightedmean"):
        sentence_transformers_settings(folder, decoder=False)
    modules = json.loads((folder / "modules.json").read_text())
    modules.append({"idx": 3, "name": "3", "path": "3_Dense", "type": "sentence_transformers.models.Dense"})
    (folder / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(ModelLoadError, match="Dense"):
        sentence_transformers_settings(folder, decoder=False)


def test_cancelled_requests_leave_the_queue_and_the_rest_are_embedded():
    config = Config(serving_type="embedding", torch_dtype="float32", continuous_batching_batch_size=2)
    loaded = load_embedder(config)
    prompts = loaded.tokenizer(TEXTS[:5]).input_ids

    async def embed(engine: Engine) -> None:
        seqs = [engine.add(prompt, POOLED) for prompt in prompts]
        engine.cancel(seqs[1])
        engine.cancel(seqs[4])
        kept = [seqs[0], seqs[2], seqs[3]]
        await asyncio.gather(*(finish(engine, seq) for seq in kept))
        assert all(seq.finish_reason == "stop" for seq in kept)
        assert engine.steps == 2, "3 inputs left, 2 per forward"
        assert engine.scheduler.idle

    run_with_engine(lambda: build_embedding_engine(loaded, config), embed)


CHAT_ENGINES = {"packed": {}, "static": {"static_cache": True},
                "static, prompts join it": {"static_cache": True, "batch_invariant": False}}


@pytest.mark.parametrize("engine_kind", list(CHAT_ENGINES))
def test_a_chat_engine_embeds_prompts_beside_generating_rows(architecture, tokenizer, engine_kind):
    """Pooled prompts join steps of decoding rows; each gives its last token's final hidden state, normalised, as
    transformers computes it alone, and the generating rows' tokens are those they give alone."""
    vocab = len(tokenizer)
    model = tiny_model(architecture, vocab, seed=2)
    reference = tiny_model(architecture, vocab, seed=2)
    reference.set_attn_implementation("sdpa")
    generating, embedded = random_prompts(3, vocab, seed=3), random_prompts(6, vocab, seed=4)
    settings = {"batch_invariant": True, **CHAT_ENGINES[engine_kind]}

    def engine() -> Engine:
        return make_engine(model, tokenizer, batch_size=8, **settings)

    async def generate_and_embed(engine: Engine) -> tuple[list, list[np.ndarray]]:
        rows = [engine.add(prompt, greedy(16)) for prompt in generating]
        while engine.steps < 2:
            await asyncio.sleep(0.005)
        pooled = [engine.add(prompt, POOLED) for prompt in embedded]
        vectors = [[delta.embedding async for delta in engine.stream(seq)][0] for seq in pooled]
        assert not any(row.finished for row in rows), "the embeddings were computed while the rows generated"
        await asyncio.gather(*(finish(engine, row) for row in rows))
        return rows, vectors

    rows, vectors = run_with_engine(engine, generate_and_embed)
    with torch.inference_mode():
        expected = [F.normalize(reference.base_model(torch.tensor([prompt])).last_hidden_state[0, -1], dim=-1)
                    for prompt in embedded]
    np.testing.assert_allclose(np.stack(vectors), torch.stack(expected).numpy(), atol=1e-5, rtol=0)
    if settings["batch_invariant"]:
        alone = run_with_engine(engine, lambda e: generate_all(e, generating, greedy(16)))
        assert [row.output_ids for row in rows] == [seq.output_ids for seq in alone]
    assert all(len(row.output_ids) == 16 for row in rows)


def save_cross_encoder(folder: Path) -> Path:
    """A tiny random BERT cross-encoder (one relevance logit) over the embedded model's vocabulary."""
    torch.manual_seed(1)
    tokenizer = transformers.AutoTokenizer.from_pretrained(embedded_embedder_folder(Path(Config().model_cache_dir)))
    config = transformers.BertConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=128, max_position_embeddings=128,
                                     num_labels=1, architectures=["BertForSequenceClassification"])
    transformers.BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_a_cross_encoder_scores_pairs_as_sentence_transformers(tmp_path):
    """Query-document pairs with their segment ids, in padded forwards of 3: the scores of CrossEncoder.predict."""
    folder = save_cross_encoder(tmp_path)
    config = Config(hf_model=str(folder), serving_type="embedding", torch_dtype="float32",
                    continuous_batching_batch_size=3)
    loaded = load_embedder(config)
    assert loaded.cross_encoder
    pairs = [("what is a cat?", text) for text in TEXTS]
    encoded = loaded.tokenizer([query for query, _ in pairs], [text for _, text in pairs])

    async def score(engine: Engine) -> list[float]:
        seqs = [engine.add(ids, POOLED, inputs=TokenTypes(types))
                for ids, types in zip(encoded.input_ids, encoded.token_type_ids)]
        return [float([delta.embedding async for delta in engine.stream(seq)][0][0]) for seq in seqs]

    scores = run_with_engine(lambda: build_embedding_engine(loaded, config), score)
    np.testing.assert_allclose(scores, CrossEncoder(str(folder), device="cpu").predict(pairs), atol=1e-5, rtol=0)
