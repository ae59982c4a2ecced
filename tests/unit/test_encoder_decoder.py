"""Encoder-decoder text models (T5 v1.0, Flan-T5, mT5, BART) on the engine: every request's greedy tokens equal
transformers' own `generate` for it alone, whether it runs alone, in a batch of different lengths, joins a
running batch, shares its prompt with siblings, loses its neighbours to cancellation, or is preempted and
recomputed; with the cache that grows and with the static cache (and its compiled step, which never
recompiles while serving)."""

import asyncio

import pytest
import torch

from batching import SamplingParams
from batching.families.encoder_decoder import TextInput
from config import Config
from model_manager import LoadedModel, build_engine
from tests.helpers.engine import WarmUpRecord, finish, greedy, run_with_engine
from tests.helpers.tiny_models import tiny_seq2seq

ARCHITECTURES = ["t5", "flan-t5", "mt5", "bart"]
DECODER_LENGTH, ENCODER_LENGTH = 64, 96


@pytest.fixture(scope="module", params=ARCHITECTURES)
def loaded(request) -> LoadedModel:
    model, tokenizer = tiny_seq2seq(request.param, seed=ARCHITECTURES.index(request.param))
    return LoadedModel(model, tokenizer, request.param, DECODER_LENGTH, ENCODER_LENGTH)


def engine_for(loaded: LoadedModel, batch_size: int = 4, **settings):
    config = Config(continuous_batching_batch_size=batch_size, architecture_type="encoder-decoder", hf_model="tiny",
                    **settings)
    return lambda: build_engine(loaded, config)


def prompts(loaded: LoadedModel, count: int) -> list[list[int]]:
    """Encoder inputs of different lengths (3 to 80 tokens), each closed by the end-of-sequence token."""
    eos = loaded.tokenizer.eos_token_id
    return [[5 + (i * 31 + j * 7) % 240 for j in range(3 + (i * 23) % 78)] + [eos] for i in range(count)]


def transformers_greedy(loaded: LoadedModel, prompt: list[int], tokens: int) -> list[int]:
    with torch.inference_mode():
        output = loaded.model.generate(torch.tensor([prompt]), max_new_tokens=tokens, min_new_tokens=tokens,
                                       do_sample=False, num_beams=1)
    return output[0, len(loaded.decoder_prompt):].tolist()


def add(engine, loaded: LoadedModel, prompt: list[int], tokens: int, count: int = 1, **params):
    """`count` sequences of one prompt; end of sequence banned, as generate's min_new_tokens bans it."""
    return engine.add_siblings(loaded.decoder_prompt, greedy(tokens, min_tokens=tokens, **params), count,
                               inputs=TextInput(prompt))


def joining(loaded: LoadedModel, budgets: list[int]):
    """Requests of different encoder lengths and budgets all added at once: their greedy outputs."""
    async def body(engine):
        inputs = prompts(loaded, len(budgets))
        seqs = [add(engine, loaded, prompt, tokens)[0] for prompt, tokens in zip(inputs, budgets)]
        return [seq.output_ids for seq in await asyncio.gather(*(finish(engine, seq) for seq in seqs))]
    return body


@pytest.mark.parametrize("static_cache", [False, True])
def test_batched_and_joining_requests_decode_as_transformers_does_alone(loaded, static_cache):
    """Six requests on four rows: different encoder lengths and budgets, so rows leave and waiting ones join."""
    budgets = [40, 12, 30, 20, 33, 9]
    inputs = prompts(loaded, len(budgets))
    outputs = run_with_engine(engine_for(loaded, static_cache=static_cache), joining(loaded, budgets))
    assert len(set(map(tuple, outputs))) > 1
    assert len({token for output in outputs for token in output}) > 10, "the model should not repeat a few tokens"
    for prompt, tokens, output in zip(inputs, budgets, outputs):
        assert output == transformers_greedy(loaded, prompt, tokens)


def test_siblings_share_the_encoder_pass(loaded):
    prompt = prompts(loaded, 3)[2]
    encoder_calls = []
    hook = loaded.model.get_encoder().register_forward_hook(lambda *_: encoder_calls.append(1))

    async def body(engine):
        seqs = add(engine, loaded, prompt, 16, count=3)
        sampled = engine.add_siblings(loaded.decoder_prompt, SamplingParams(max_tokens=16, temperature=2.0, seed=7),
                                      2, inputs=TextInput(prompt))
        done = await asyncio.gather(*(finish(engine, seq) for seq in [*seqs, *sampled]))
        return [seq.output_ids for seq in done]

    try:
        outputs = run_with_engine(engine_for(loaded, batch_size=8), body)
    finally:
        hook.remove()
    expected = transformers_greedy(loaded, prompt, 16)
    assert outputs[:3] == [expected] * 3
    assert outputs[3] != outputs[4]  # seeds 7 and 8
    assert len(encoder_calls) == 2  # one per prompt: the greedy three, the sampled two


@pytest.mark.parametrize("static_cache", [False, True])
def test_cancelled_rows_leave_and_the_others_decode_on(loaded, static_cache):
    inputs = prompts(loaded, 4)

    async def body(engine):
        seqs = [add(engine, loaded, prompt, 30)[0] for prompt in inputs]
        async for delta in engine.stream(seqs[1]):
            if len(seqs[1].output_ids) >= 3:
                break  # leaving the stream cancels the sequence
        engine.cancel(seqs[2])
        kept = [seqs[0], seqs[3]]
        await asyncio.gather(*(finish(engine, seq) for seq in kept))
        return [seq.output_ids for seq in kept], engine.scheduler.memory.used_tokens

    (first, last), held = run_with_engine(engine_for(loaded, static_cache=static_cache), body)
    assert first == transformers_greedy(loaded, inputs[0], 30)
    assert last == transformers_greedy(loaded, inputs[3], 30)
    assert held == 0


@pytest.mark.parametrize("static_cache", [False, True])
def test_a_preempted_sequence_recomputes_its_tokens_and_goes_on(loaded, static_cache):
    inputs = prompts(loaded, 3)

    async def body(engine):
        seqs = [add(engine, loaded, prompt, 24)[0] for prompt in inputs]
        plan = engine.scheduler.plan

        def preempting_once_it_has_decoded():  # where the scheduler itself preempts: between steps
            if len(seqs[1].output_ids) >= 6 and not engine.scheduler.preemptions:
                engine.scheduler.preempt(seqs[1])
            return plan()
        engine.scheduler.plan = preempting_once_it_has_decoded
        await asyncio.gather(*(finish(engine, seq) for seq in seqs))
        return [seq.output_ids for seq in seqs], engine.scheduler.preemptions

    outputs, preemptions = run_with_engine(engine_for(loaded, static_cache=static_cache), body)
    assert preemptions == 1
    for prompt, output in zip(inputs, outputs):
        assert output == transformers_greedy(loaded, prompt, 24)


@pytest.mark.parametrize("static_cache", [False, True])
def test_batch_invariant_greedy_output_does_not_depend_on_the_neighbours(loaded, static_cache):
    """Encoder inputs encoded alone, every forward at least four rows (MKL_CBWR=AUTO,STRICT, set by conftest)."""
    inputs = prompts(loaded, 8)

    def result(seq):  # the log-probabilities too: equal to the bit only if every logit is
        return seq.output_ids, seq.cumulative_logprob

    async def together(engine):
        seqs = [add(engine, loaded, prompt, 20)[0] for prompt in inputs]
        return [result(await finish(engine, seq)) for seq in seqs]

    def alone(prompt):
        async def body(engine):
            return result(await finish(engine, add(engine, loaded, prompt, 20)[0]))
        return body

    build = engine_for(loaded, batch_size=8, batch_invariant=True, static_cache=static_cache)
    batched = run_with_engine(build, together)
    assert batched == [run_with_engine(build, alone(prompt)) for prompt in inputs]
    assert len({tuple(ids) for ids, _ in batched}) > 1


@pytest.mark.parametrize("architecture", ["flan-t5", "bart"])
def test_the_compiled_decode_step_decodes_as_generate_and_never_recompiles_while_serving(architecture):
    """--torch-compile: every bucket of rows is compiled during warm-up (its progress reported); then requests
    that join and leave at every batch size decode transformers' tokens without one more compilation."""
    model, tokenizer = tiny_seq2seq(architecture, seed=11)
    loaded = LoadedModel(model, tokenizer, architecture, DECODER_LENGTH, ENCODER_LENGTH)
    budgets = [14, 5, 9, 3, 11]
    warm_up = WarmUpRecord()
    outputs = run_with_engine(warm_up.warmed(engine_for(loaded, batch_size=3, torch_compile=True)),
                              joining(loaded, budgets))
    assert warm_up.buckets == [1, 2, 3]
    warm_up.assert_complete_and_never_recompiled()
    for prompt, tokens, output in zip(prompts(loaded, len(budgets)), budgets, outputs):
        assert output == transformers_greedy(loaded, prompt, tokens)


def test_unsupported_families_are_refused_with_the_served_ones_named():
    from transformers import PegasusConfig, PegasusForConditionalGeneration
    model = PegasusForConditionalGeneration(PegasusConfig(vocab_size=64, d_model=16, encoder_layers=1,
                                                          decoder_layers=1, encoder_ffn_dim=16, decoder_ffn_dim=16))
    loaded = LoadedModel(model, None, "pegasus", 32, 32)
    with pytest.raises(RuntimeError, match="'pegasus' are not served; these are: T5, mT5, BART"):
        engine_for(loaded)()
