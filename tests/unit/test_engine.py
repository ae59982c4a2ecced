"""The engine on tiny random-weight models: correctness against transformers, batch invariance,
KV row reuse, cancellation."""

import asyncio
import random
import threading

import pytest
import torch

from batching import SamplingParams
from batching.torch_thread import THREAD_NAME
from tests.helpers.engine import finish, generate_all, greedy, make_engine, run_with_engine
from tests.helpers.tiny_models import tiny_model


def random_prompts(count: int, vocab: int, seed: int = 1, lengths=(3, 40)) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.randint(*lengths))] for _ in range(count)]


def test_greedy_tokens_are_transformers_argmax(architecture, tokenizer):
    """Every token the engine picks is the top token of a plain transformers forward (sdpa)."""
    vocab = len(tokenizer)
    model = tiny_model(architecture, vocab)
    reference = tiny_model(architecture, vocab)
    reference.set_attn_implementation("sdpa")
    prompts = random_prompts(3, vocab, lengths=(5, 30))
    seqs = run_with_engine(lambda: make_engine(model, tokenizer),
                           lambda engine: generate_all(engine, prompts, greedy(12)))
    for seq in seqs:
        ids = torch.tensor([seq.prompt_ids + seq.output_ids])
        with torch.inference_mode():
            logits = reference(ids).logits[0, len(seq.prompt_ids) - 1:-1]
        chosen = logits.gather(1, torch.tensor(seq.output_ids)[:, None])[:, 0]
        assert torch.all(logits.max(dim=1).values - chosen <= 1e-4), (architecture, seq.output_ids)


def test_sixteen_prompts_alone_equal_batched(architecture, tokenizer):
    vocab = len(tokenizer)
    model = tiny_model(architecture, vocab, seed=3)
    prompts = random_prompts(16, vocab, seed=7)
    params = greedy(20)

    def engine():
        return make_engine(model, tokenizer, batch_size=16)

    batched = run_with_engine(engine, lambda e: generate_all(e, prompts, params))
    alone = [run_with_engine(engine, lambda e, p=p: generate_all(e, [p], params))[0] for p in prompts]
    assert [s.output_ids for s in batched] == [s.output_ids for s in alone]


def test_memory_is_reused_while_others_keep_decoding(tokenizer):
    """Short requests finish and leave mid-way, half the prompts share a prefix that the prefix cache serves;
    the others must still give exactly their solo output, through several waves of admissions, and the K/V
    copies happen on the torch thread."""
    vocab = len(tokenizer)
    model = tiny_model("llama", vocab, seed=5)
    shared = random_prompts(1, vocab, seed=12, lengths=(40, 40))[0]
    prompts = [p if i % 2 else shared + p for i, p in enumerate(random_prompts(12, vocab, seed=11))]
    limits = [3, 30, 5, 25, 1, 18, 7, 30, 2, 12, 9, 20]

    copy_threads = set()

    def engine():
        built = make_engine(model, tokenizer, batch_size=4)
        arena = built.scheduler.memory
        apply = arena.apply_pending

        def recording_apply():
            if arena.pending:
                copy_threads.add(threading.current_thread().name)
            apply()
        arena.apply_pending = recording_apply
        return built

    async def mixed(engine):
        seqs = [engine.add(p, greedy(n)) for p, n in zip(prompts, limits)]
        assert engine.stats().waiting == 12
        done = await asyncio.gather(*(finish(engine, s) for s in seqs))
        assert engine.stats().running == 0 and engine.stats().waiting == 0
        arena = engine.scheduler.memory
        assert arena.used_tokens == arena.cached_tokens, "an idle engine holds only prefix-cache entries"
        return done

    batched = run_with_engine(engine, mixed)
    assert copy_threads and all(name.startswith(THREAD_NAME) for name in copy_threads), copy_threads
    assert sum(s.cached_tokens > 0 for s in batched) >= 4, [s.cached_tokens for s in batched]
    for seq, prompt, limit in zip(batched, prompts, limits):
        alone = run_with_engine(engine, lambda e: generate_all(e, [prompt], greedy(limit)))[0]
        assert seq.output_ids == alone.output_ids
        assert len(seq.output_ids) == limit and seq.finish_reason == "length"


def test_cache_grows_past_its_initial_capacity(tokenizer):
    vocab = len(tokenizer)
    model = tiny_model("qwen2", vocab, seed=2)
    long_prompt = random_prompts(1, vocab, seed=4, lengths=(300, 300))[0]
    short_prompt = random_prompts(1, vocab, seed=5, lengths=(10, 10))[0]

    def engine():
        return make_engine(model, tokenizer)

    async def both(engine):
        seqs = await generate_all(engine, [short_prompt, long_prompt], greedy(8))
        return seqs

    batched = run_with_engine(engine, both)
    alone = run_with_engine(engine, lambda e: generate_all(e, [long_prompt], greedy(8)))[0]
    assert batched[1].output_ids == alone.output_ids


def test_cancel_frees_the_row_within_a_step(tokenizer):
    model = tiny_model("llama", len(tokenizer))

    async def cancel_one(engine):
        keep = engine.add([5, 6, 7], greedy(200))
        drop = engine.add([8, 9, 10], greedy(200))
        stream = engine.stream(drop)
        await anext(stream)
        await anext(stream)
        assert engine.stats().running == 2
        steps_before = engine.stats().steps
        await stream.aclose()
        while engine.stats().running != 1:
            await asyncio.sleep(0.001)
        assert engine.stats().steps - steps_before <= 1
        assert keep.row == 0 and not keep.finished
        await finish(engine, keep)
        return len(drop.output_ids), len(keep.output_ids)

    dropped, kept = run_with_engine(lambda: make_engine(model, tokenizer), cancel_one)
    assert dropped < 200 and kept == 200


def test_queue_limit_rejects_instead_of_waiting(tokenizer):
    from batching import QueueFullError
    model = tiny_model("llama", len(tokenizer))

    async def overfill(engine):
        seqs = [engine.add([5, 6], greedy(4)) for _ in range(3)]
        with pytest.raises(QueueFullError):
            engine.add([5, 6], greedy(4))
        for seq in seqs:
            await finish(engine, seq)
        engine.add([5, 6], greedy(1))  # room again once they finished

    run_with_engine(lambda: make_engine(model, tokenizer, batch_size=2, max_concurrent=3), overfill)


def test_seeded_sampling_is_reproducible_whatever_the_batch(tokenizer):
    vocab = len(tokenizer)
    model = tiny_model("llama", vocab, seed=9)
    prompts = random_prompts(6, vocab, seed=3)
    params = SamplingParams(max_tokens=15, temperature=1.0, top_p=0.9, seed=1234)

    def engine():
        return make_engine(model, tokenizer)

    batched = run_with_engine(engine, lambda e: generate_all(e, prompts, params))
    alone = run_with_engine(engine, lambda e: generate_all(e, [prompts[2]], params))[0]
    assert batched[2].output_ids == alone.output_ids
    other_seed = run_with_engine(engine, lambda e: generate_all(
        e, [prompts[2]], SamplingParams(max_tokens=15, temperature=1.0, top_p=0.9, seed=99)))[0]
    assert other_seed.output_ids != alone.output_ids


def test_a_failing_step_fails_its_requests_and_the_engine_keeps_serving(tokenizer):
    model = tiny_model("llama", len(tokenizer))
    vocab = len(tokenizer)

    async def bad_then_good(engine):
        bad = engine.add([vocab + 10], greedy(3))  # an id past the embedding table makes the forward raise
        deltas = [d async for d in engine.stream(bad)]
        assert deltas[-1].finish_reason == "error"
        good = await finish(engine, engine.add([5, 6, 7], greedy(3)))
        assert len(good.output_ids) == 3 and engine.alive

    run_with_engine(lambda: make_engine(model, tokenizer), bad_then_good)


def test_siblings_share_one_prefill_and_sample_independently(tokenizer):
    vocab = len(tokenizer)
    model = tiny_model("llama", vocab, seed=4)
    prompt = random_prompts(1, vocab, seed=8)[0]
    prompt_tokens = []

    def engine():
        built = make_engine(model, tokenizer, prefix_caching=False)
        step = built.runner.step
        built.runner.step = lambda spans: prompt_tokens.extend(
            s.end - s.start for s in spans if s.start < len(s.seq.prompt_ids)) or step(spans)
        return built

    async def three(engine):
        greedy_three = engine.add_siblings(prompt, greedy(10), 3)
        sampled_three = engine.add_siblings(prompt, SamplingParams(max_tokens=10, temperature=1.0, seed=5), 3)
        await asyncio.gather(*(finish(engine, s) for s in greedy_three + sampled_three))
        return greedy_three, sampled_three

    greedy_three, sampled_three = run_with_engine(engine, three)
    # each group's prompt is prefilled once; each sibling copies its K/V and computes only the last token
    assert sum(prompt_tokens) == 2 * len(prompt) + 4, prompt_tokens
    alone = run_with_engine(lambda: make_engine(model, tokenizer), lambda e: generate_all(e, [prompt], greedy(10)))[0]
    assert all(s.output_ids == alone.output_ids for s in greedy_three)
    assert len({tuple(s.output_ids) for s in sampled_three}) == 3
    seed_plus_one = run_with_engine(lambda: make_engine(model, tokenizer), lambda e: generate_all(
        e, [prompt], SamplingParams(max_tokens=10, temperature=1.0, seed=6)))[0]
    assert sampled_three[1].output_ids == seed_plus_one.output_ids


def test_prompt_logprobs_match_a_plain_forward(tokenizer):
    vocab = len(tokenizer)
    model = tiny_model("qwen2", vocab, seed=6)
    prompts = random_prompts(2, vocab, seed=9)
    params = SamplingParams(max_tokens=2, temperature=0.0, logprobs=2, prompt_logprobs=True)
    seqs = run_with_engine(lambda: make_engine(model, tokenizer), lambda e: generate_all(e, prompts, params))
    for seq in seqs:
        with torch.inference_mode():
            model.set_attn_implementation("sdpa")
            expected = model(torch.tensor([seq.prompt_ids])).logits[0].log_softmax(dim=-1)
            model.set_attn_implementation("batchwise")
        assert seq.prompt_logprobs[0] is None and len(seq.prompt_logprobs) == len(seq.prompt_ids)
        for position, entry in enumerate(seq.prompt_logprobs[1:]):
            assert entry.token_id == seq.prompt_ids[position + 1]
            assert abs(entry.logprob - expected[position, entry.token_id].item()) < 1e-4
            assert len(entry.top) == 2 and entry.top[0][1] >= entry.logprob - 1e-6
