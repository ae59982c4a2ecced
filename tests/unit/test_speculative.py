"""Speculative decoding with n-gram drafts and a draft model (--speculative-config): the same greedy tokens and
log-probabilities as without drafts, drafts proposed and accepted (so that nothing here passes vacuously),
rejected drafts' K/V rolled back, sampled rows keeping the model's distribution, and the configurations the server
refuses."""

from __future__ import annotations

import asyncio
import json
import logging
import random
from dataclasses import dataclass, field

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from batching import SamplingParams
from batching.sequence import Sequence
from batching.speculative import SpeculativeSettings, propose, verify
from config import Config, ConfigError, parse_config, parse_speculative_config
from model_manager import ModelLoadError, engine_settings
from serving.metrics import Metrics
from tests.helpers.engine import make_engine, run_with_engine
from tests.helpers import quality
from tests.helpers.quality import scale_weights
from tests.helpers.tiny_models import byte_tokenizer, tiny_model

NGRAM = '{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 1}'


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


def repeating_model(tokenizer, dtype: torch.dtype = torch.float32):
    """A GPT-2 whose greedy answers repeat runs of tokens, but not always the same ones: drafts are accepted and
    rejected."""
    model = tiny_model("gpt2", len(tokenizer), seed=11)
    scale_weights(model, 2.0)
    return model.to(dtype)


@pytest.fixture(scope="module")
def model(tokenizer):
    return repeating_model(tokenizer)


@dataclass
class Served:
    text: str = ""
    tokens: list[int] = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    finish_reason: str | None = None


async def serve(engine, seq) -> Served:
    served = Served()
    async for delta in engine.stream(seq):
        served.text += delta.text
        served.tokens.extend(delta.token_ids)
        served.logprobs.extend(delta.logprobs)
        served.finish_reason = delta.finish_reason
    return served


def prompts(count: int, seed: int = 1) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 250) for _ in range(rng.randint(5, 40))] for _ in range(count)]


def serve_all(model, tokenizer, requests: list[tuple[list[int], SamplingParams]], speculative: str | None,
              steps: list | None = None, checked: list | None = None, prepare=None, batch_size: int = 8, **settings):
    """The requests at once; the engine after they ended, each step's spans in `steps`, and in `checked` whether
    the rollback invariant held after each step (check_rollback); prepare(engine) before it starts."""
    engine = make_engine(model, tokenizer, batch_size=batch_size, batch_invariant=False, speculative_config=speculative,
                         **settings)
    if prepare is not None:
        prepare(engine)
    if checked is not None:
        check_rollback(engine, checked)
    if steps is not None:
        step = engine.runner.step
        engine.runner.step = lambda spans: steps.append(spans) or step(spans)

    async def body(engine):
        return await asyncio.gather(*(serve(engine, engine.add(prompt, params)) for prompt, params in requests))
    return run_with_engine(lambda: engine, body), engine


def check_rollback(engine, checked: list) -> None:
    """After each step's tokens are delivered, whether each decoding row's computed tokens are exactly its tokens but
    the last (rejected drafts' K/V never count)."""
    deliver = engine._deliver

    def checked_deliver(spans, emitted):
        deliver(spans, emitted)
        checked.extend(seq.computed == seq.length - 1 for seq in engine.scheduler.running if seq.decoding
                       or (seq.output_ids and seq.computed >= len(seq.prompt_ids)))
    engine._deliver = checked_deliver


def greedy(max_tokens: int, **kwargs) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, logprobs=2, **kwargs)


def test_greedy_tokens_and_logprobs_are_those_without_drafts(model, tokenizer):
    """Several requests of different lengths at once, ended by max_tokens, a stop string, a stop token and eos, one
    with a repetition penalty (no drafts) decoding beside rows with drafts."""
    plain = [(prompt, greedy(limit)) for prompt, limit in zip(prompts(6), (40, 24, 33, 17, 40, 29))]
    first, _ = serve_all(model, tokenizer, plain, None)
    stop_text = tokenizer.decode(first[0].tokens[20:22])
    requests = [(plain[0][0], greedy(40, stop=(stop_text,))), (plain[1][0], greedy(24, stop_token_ids=(
        first[1].tokens[12],))), *plain[2:5], (plain[5][0], greedy(29, repetition_penalty=1.3))]
    steps = []
    without, _ = serve_all(model, tokenizer, requests, None)
    with_drafts, engine = serve_all(model, tokenizer, requests, NGRAM, steps)

    assert [s.tokens for s in with_drafts] == [s.tokens for s in without]
    assert [(s.text, s.finish_reason) for s in with_drafts] == [(s.text, s.finish_reason) for s in without]
    assert with_drafts[0].finish_reason == "stop" and with_drafts[1].finish_reason == "stop"
    for ours, theirs in zip(with_drafts, without):
        assert [(t.token_id, [i for i, _ in t.top]) for t in ours.logprobs] == \
            [(t.token_id, [i for i, _ in t.top]) for t in theirs.logprobs]
        # the same positions' logits, but from a step of another shape (attention over several queries, not one)
        assert torch.allclose(torch.tensor([t.logprob for t in ours.logprobs]),
                              torch.tensor([t.logprob for t in theirs.logprobs]), atol=1e-4)
    drafts = engine.stats().drafts
    assert 0 < drafts.accepted < drafts.proposed, drafts
    penalised = [span for spans in steps for span in spans if span.seq.params.repetition_penalty != 1.0]
    assert penalised and not any(span.draft for span in penalised)
    assert any(any(span.draft for span in spans) and any(span.seq.decoding and not span.draft for span in spans)
               for spans in steps), "a step should hold rows with and without drafts"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("static_cache", [False, True])
def test_every_token_verified_is_transformers_choice(tokenizer, dtype, static_cache):
    """The quality matrix's check (tests/helpers/quality.py) on a model whose drafts are accepted (the matrix's
    models are built not to repeat themselves, so there its drafts are rejected): each served token is the token
    transformers' forward chooses after the same tokens, with its log-probability, within the dtype's bound;
    drafts verified packed, and in the static step."""
    model = repeating_model(tokenizer, dtype)
    references = {}
    for reference_dtype in dict.fromkeys([dtype, torch.float32]):
        references[reference_dtype] = repeating_model(tokenizer, reference_dtype)
        references[reference_dtype].set_attn_implementation("sdpa")
    requests = [(prompt, greedy(30)) for prompt in prompts(4, seed=5)]
    served, engine = serve_all(model, tokenizer, requests, NGRAM, static_cache=static_cache,
                               static_cache_decoder_max_length=96)
    assert engine.stats().drafts.accepted > 0
    for (prompt, _), answer in zip(requests, served):
        ids = torch.tensor([prompt + answer.tokens[:-1]])
        same, float32 = (quality.forward_logprobs(references[d], input_ids=ids)[len(prompt) - 1:]
                         for d in (dtype, torch.float32))
        tokens = quality.Served(answer.tokens, [token.logprob for token in answer.logprobs])
        assert quality.divergence(tokens, same, quality.BOUNDS[dtype], float32) is None


@pytest.mark.parametrize("mode", ["static_cache", "torch_compile"])
def test_drafts_are_verified_in_the_static_step(model, tokenizer, mode):
    """Steps with drafts run in the static step (compiled with --torch-compile), each token in a row of its own as
    prompt chunks do: the same tokens and log-probabilities as without drafts, and every step with drafts ran there
    (none fell back to the packed forward)."""
    requests = [(prompt, greedy(30)) for prompt in prompts(4, seed=6)]
    settings = {"static_cache": True, "static_cache_decoder_max_length": 96, mode: True}
    without, _ = serve_all(model, tokenizer, requests, None, **settings)
    steps, verified_static = [], []

    def count_static_verifications(engine):
        draft_logits = engine.runner.static.draft_logits
        engine.runner.static.draft_logits = lambda spans: verified_static.append(spans) or draft_logits(spans)

    with_drafts, engine = serve_all(model, tokenizer, requests, NGRAM, steps, prepare=count_static_verifications,
                                    **settings)
    assert [s.tokens for s in with_drafts] == [s.tokens for s in without]
    for ours, theirs in zip(with_drafts, without):
        assert torch.allclose(torch.tensor([t.logprob for t in ours.logprobs]),
                              torch.tensor([t.logprob for t in theirs.logprobs]), atol=1e-4)
    assert engine.stats().drafts.accepted > 0
    drafted = [spans for spans in steps if any(span.draft for span in spans)]
    assert drafted and verified_static == drafted


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_rejected_drafts_leave_no_kv_behind(model, tokenizer, prefix_caching):
    """After every step a decoding row's computed tokens are exactly its tokens but the last (rejected drafts' K/V
    never count); after the requests end, the arena holds what it holds without drafts; and a later prompt that
    starts with a finished request's answer is served from the cache with the right output."""
    requests = [(prompt, greedy(36)) for prompt in prompts(4, seed=3)]
    checked = []
    _, plain = serve_all(model, tokenizer, requests, None, prefix_caching=prefix_caching)
    served, drafting = serve_all(model, tokenizer, requests, NGRAM, checked=checked, prefix_caching=prefix_caching)
    assert checked and all(checked)
    arena, plain_arena = drafting.scheduler.memory, plain.scheduler.memory
    assert arena.used_tokens == plain_arena.used_tokens
    assert arena.cached_tokens == plain_arena.cached_tokens
    assert 0 < drafting.stats().drafts.accepted < drafting.stats().drafts.proposed

    follow_up = requests[0][0] + served[0].tokens + [7, 8, 9]
    engine = make_engine(model, tokenizer, batch_size=8, batch_invariant=False, speculative_config=NGRAM,
                         prefix_caching=prefix_caching)
    check_rollback(engine, checked)

    async def both_turns(engine):
        await serve(engine, engine.add(requests[0][0], greedy(36)))
        seq = engine.add(follow_up, greedy(20))
        return seq, await serve(engine, seq)
    seq, answer = run_with_engine(lambda: engine, both_turns)
    assert all(checked)
    first_computed = len(follow_up) - 4  # its last token's K/V never were
    assert seq.cached_tokens == (first_computed // 16 * 16 if prefix_caching else 0)
    expected, _ = serve_all(model, tokenizer, [(follow_up, greedy(20))], None, prefix_caching=False)
    assert answer.tokens == expected[0].tokens


def draft_config(folder, tokens: int = 3) -> str:
    return json.dumps({"method": "draft_model", "model": str(folder), "num_speculative_tokens": tokens})


@pytest.fixture(scope="module")
def draft_folders(model, tokenizer, tmp_path_factory):
    """Draft models with the target's tokenizer: the target itself (its drafts are always right) and another
    random GPT-2 (its drafts mostly wrong); and one with another tokenizer."""
    folders = {name: tmp_path_factory.mktemp(name) for name in ("itself", "other", "foreign")}
    for name, draft in [("itself", model), ("other", tiny_model("gpt2", len(tokenizer), seed=5))]:
        draft.save_pretrained(folders[name])
        tokenizer.save_pretrained(folders[name])
    foreign = byte_tokenizer(eos_token="<end>", bos_token="<start>")
    tiny_model("gpt2", len(foreign), seed=5).save_pretrained(folders["foreign"])
    foreign.save_pretrained(folders["foreign"])
    return folders


@pytest.mark.parametrize("static_cache", [False, True])
def test_a_draft_models_drafts_keep_the_greedy_tokens(model, tokenizer, draft_folders, static_cache):
    """Drafts from the target itself are all accepted, a random model's mostly rejected; either way the tokens are
    those without drafts, and the draft's caches are kept for the rows of the latest drafting step only."""
    requests = [(prompt, greedy(limit)) for prompt, limit in zip(prompts(5, seed=8), (30, 12, 25, 30, 18))]
    settings = dict(static_cache=True, static_cache_decoder_max_length=96) if static_cache else {}
    without, _ = serve_all(model, tokenizer, requests, None, **settings)
    steps = []
    exact, engine = serve_all(model, tokenizer, requests, draft_config(draft_folders["itself"]), steps, **settings)
    assert [s.tokens for s in exact] == [s.tokens for s in without]
    drafts = engine.stats().drafts
    assert drafts.proposed > 0 and drafts.accepted == drafts.proposed
    drafting = [len([span for span in spans if span.draft]) for spans in steps]
    assert 0 < len(engine.runner.drafter.caches) <= max(drafting) <= engine.scheduler.speculative.max_sequences
    other, engine = serve_all(model, tokenizer, requests, draft_config(draft_folders["other"]), **settings)
    assert [s.tokens for s in other] == [s.tokens for s in without]
    assert 0 < engine.stats().drafts.accepted < engine.stats().drafts.proposed / 2


def test_a_draft_model_with_another_vocabulary_is_refused(model, tokenizer, draft_folders):
    with pytest.raises(ModelLoadError, match="another tokenizer"):
        make_engine(model, tokenizer, speculative_config=draft_config(draft_folders["foreign"]),
                    batch_invariant=False)


def sequence(params: SamplingParams, generator: torch.Generator) -> Sequence:
    seq = Sequence([1, 2, 3], params, None, frozenset())
    seq.generator = generator
    return seq


def test_rejection_sampling_keeps_the_models_distribution():
    """Drafts against a small vocabulary at temperature 0.7 with top-k 6: the first token emitted is distributed as
    the processed distribution at the first position, whatever the draft; after an accepted draft token, the next
    as the distribution at the next. 20,000 seeded verifications, total variation within 0.02."""
    torch.manual_seed(0)
    logits = torch.randn(3, 8) * 1.5
    params = SamplingParams(max_tokens=10, temperature=0.7, top_k=6)
    expected = torch.stack([row / 0.7 for row in logits])
    expected = expected.masked_fill(expected < expected.sort(dim=-1, descending=True).values[:, 5:6], float("-inf"))
    expected = expected.softmax(dim=-1)
    likely, unlikely = int(expected[0].argmax()), int(expected[0].argsort()[2])  # a token p keeps but rarely picks
    seq = sequence(params, torch.Generator().manual_seed(1))
    trials = 20_000
    for draft in [(likely, int(expected[1].argmax())), (unlikely, 0)]:
        first, second = torch.zeros(8), torch.zeros(8)
        for _ in range(trials):
            tokens = [token.token_id for token in verify(logits, seq, draft)]
            first[tokens[0]] += 1
            if tokens[0] == draft[0]:
                second[tokens[1]] += 1
        assert (first / trials - expected[0]).abs().sum() / 2 < 0.02, (draft, first / trials, expected[0])
        if draft[0] == likely:  # accepted often enough to judge what follows
            assert (second / second.sum() - expected[1]).abs().sum() / 2 < 0.02, (second / second.sum(), expected[1])
    outside = int(expected[0].argmin())  # ruled out by top-k: never accepted
    assert all(verify(logits, seq, (outside,))[0].token_id != outside for _ in range(500))


def test_verification_reports_each_tokens_own_logprob():
    logits = torch.randn(3, 8)
    seq = sequence(SamplingParams(max_tokens=10, temperature=0.0, logprobs=2), torch.Generator())
    targets = logits.argmax(dim=-1).tolist()
    emitted = verify(logits, seq, (targets[0], (targets[1] + 1) % 8))
    assert [token.token_id for token in emitted] == targets[:2]
    log_softmax = logits.log_softmax(dim=-1)
    for row, token in enumerate(emitted):
        assert token.logprob == pytest.approx(log_softmax[row, token.token_id].item(), abs=1e-6)
        assert [i for i, _ in token.top] == log_softmax[row].topk(2).indices.tolist()
    assert [t.token_id for t in verify(logits, seq, tuple(targets[:2]))] == targets  # all accepted, and a bonus


def test_drafts_follow_the_most_recent_occurrence_of_the_longest_ngram():
    settings = SpeculativeSettings(tokens=3, lookup_min=1, lookup_max=3, max_sequences=8)
    assert propose([5, 6, 7, 1, 9, 9, 5, 6, 7, 2, 3, 8, 6, 7], settings, 3) == (2, 3, 8)  # "6 7", the later one
    assert propose([5, 6, 7, 1, 2, 6, 7, 4, 8, 5, 6, 7], settings, 3) == (1, 2, 6)  # "5 6 7" beats a later "6 7"
    assert propose([1, 2, 1, 2, 1], settings, 2) == (2, 1)  # the continuation may run into the end
    assert propose([1, 2, 3, 4], settings, 3) == ()
    assert propose([4, 1, 4], settings, 0) == ()
    assert propose([4, 1, 4], SpeculativeSettings(3, 2, 3, 8), 3) == ()  # n-grams shorter than lookup_min: none


@pytest.mark.parametrize("text, reason", [
    ("{not json", "expected a JSON object"),
    ("[1, 2]", "expected a JSON object"),
    ('{"method": "eagle", "num_speculative_tokens": 2}', "unknown method 'eagle'"),
    ('{"method": "draft_model", "num_speculative_tokens": 2}', "draft_model needs the draft's hub id or folder"),
    ('{"model": "x", "num_speculative_tokens": 2, "prompt_lookup_max": 3}',
     "unsupported keys ['prompt_lookup_max'] for draft_model"),
    ('{"method": "ngram"}', "num_speculative_tokens must be a whole number of at least 1, got None"),
    ('{"method": "ngram", "num_speculative_tokens": 0}', "num_speculative_tokens must be a whole number"),
    ('{"method": "ngram", "num_speculative_tokens": 2.5}', "num_speculative_tokens must be a whole number"),
    ('{"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 0}', "prompt_lookup_min must be"),
    ('{"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 4, "prompt_lookup_max": 2}',
     "prompt_lookup_min (4) is more than prompt_lookup_max (2)"),
    ('{"method": "ngram", "num_speculative_tokens": 2, "disable_by_batch_size": 4}', "unsupported keys"),
])
def test_a_bad_speculative_config_stops_the_server_with_the_reason(text, reason, capsys, monkeypatch):
    with pytest.raises(SystemExit):
        parse_config(["--speculative-config", text])
    assert reason in capsys.readouterr().err
    monkeypatch.setenv("SPECULATIVE_CONFIG", text)
    with pytest.raises(SystemExit):
        parse_config([])
    assert reason in capsys.readouterr().err
    with pytest.raises(ConfigError, match="speculative-config"):  # a Config built in code is refused when built
        engine_settings(Config(speculative_config=text), torch.device("cpu"))


def test_the_lookup_lengths_default_as_vllms():
    def lookup(extra: str) -> tuple[int, int]:
        spec = parse_speculative_config('{"method": "ngram", "num_speculative_tokens": 3' + extra + "}")
        return spec["prompt_lookup_min"], spec["prompt_lookup_max"]
    assert lookup("") == (5, 5)
    assert lookup(', "prompt_lookup_max": 3') == (3, 3)
    assert lookup(', "prompt_lookup_min": 2') == (2, 2)
    assert parse_config(["--speculative-config", NGRAM]).speculative_config == NGRAM


def test_engines_that_cannot_draft_say_so(caplog):
    cpu = torch.device("cpu")
    settings = engine_settings(Config(speculative_config=NGRAM), cpu).speculative
    assert settings == SpeculativeSettings(tokens=4, lookup_min=1, lookup_max=4, max_sequences=32 // 5)
    assert engine_settings(Config(), cpu).speculative is None
    with caplog.at_level(logging.WARNING, logger="batchwise.model"):
        for ignored in [{"batch_invariant": True}, {"serving_type": "whisper"},
                        {"architecture_type": "encoder-decoder"}]:
            assert engine_settings(Config(speculative_config=NGRAM, **ignored), cpu).speculative is None
    assert [record.getMessage().split(" ignored ")[1] for record in caplog.records
            if record.name == "batchwise.model"] == [
        "in batch-invariant mode: no drafts", "for Whisper: no drafts", "for encoder-decoder models: no drafts"]


def test_a_request_that_opts_out_never_drafts(model, tokenizer):
    steps = []
    requests = [(prompt, greedy(30, speculative=index % 2 == 0)) for index, prompt in enumerate(prompts(4, seed=5))]
    served, _ = serve_all(model, tokenizer, requests, NGRAM, steps)
    without, _ = serve_all(model, tokenizer, requests, None)
    assert [s.tokens for s in served] == [s.tokens for s in without]
    spans = [span for spans in steps for span in spans if span.seq.decoding]
    assert any(span.draft for span in spans if span.seq.params.speculative)
    assert not any(span.draft for span in spans if not span.seq.params.speculative)


def test_a_busy_engine_drafts_nothing(model, tokenizer):
    """With 16 prompt tokens a step, 4-token drafts are verified while at most 3 sequences are in the engine: not
    while three decode and three more wait for a row, but once those three have the engine to themselves."""
    steps = []  # each step's sequences in the engine, its decoding rows, and whether it had room for drafts

    def watch(engine):
        step = engine.runner.step

        def watched(spans):
            steps.append((engine.scheduler.sequences, sum(span.seq.decoding for span in spans),
                          any(span.draft_room for span in spans)))
            return step(spans)
        engine.runner.step = watched
    some = prompts(6, seed=4)
    requests = [(prompt, greedy(limit)) for prompt, limit in zip(some[0::2] + some[1::2], [4, 4, 4, 30, 30, 30])]
    serve_all(model, tokenizer, requests, NGRAM, prepare=watch, batch_size=3, max_num_batched_tokens=16)
    assert any(load > 3 and decoding == 3 for load, decoding, _ in steps)
    assert any(drafted for _, _, drafted in steps) and not any(drafted for load, _, drafted in steps if load > 3)


def test_metrics_export_the_draft_counters(model, tokenizer):
    _, engine = serve_all(model, tokenizer, [(prompt, greedy(30)) for prompt in prompts(2)], NGRAM)
    metrics = Metrics()
    metrics.serve("tiny", engine, lambda: None)
    samples = {sample.name: sample.value for family in text_string_to_metric_families(
        metrics.exposition().decode()) for sample in family.samples}
    drafts = engine.stats().drafts
    assert samples["batchwise_spec_decode_draft_tokens_total"] == drafts.proposed > 0
    assert samples["batchwise_spec_decode_accepted_tokens_total"] == drafts.accepted > 0
    assert samples["batchwise_spec_decode_verification_steps_total"] == drafts.verifications > 0
    _, plain = serve_all(model, tokenizer, [(prompts(1)[0], greedy(4))], None)
    metrics.serve("tiny", plain, lambda: None)
    assert b"spec_decode" not in metrics.exposition()
