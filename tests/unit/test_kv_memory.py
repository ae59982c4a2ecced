"""KV memory under a budget: extents, the prefix cache, admission that waits for memory, preemption, and
chunked prefill, on tiny random-weight models; outputs must equal what each request gives alone."""

import asyncio
import random

import pytest
import torch

from batching import SamplingParams
from batching.chunk_sizer import FEWEST_TOKENS, SLOWDOWN, ChunkSizer
from batching.extents import Extent, ExtentAllocator
from batching.prefix_cache import BLOCK_TOKENS, CachedPrefix, PrefixCache
from config import Config
from model_manager import LoadedModel, engine_settings
from models import CompletionRequest
from serving.errors import APIError
from serving.text_service import ServingOptions, TextService
from tests.helpers.engine import finish, generate_all, greedy, make_engine, record_rows_leaving_slots, run_with_engine
from tests.helpers.tiny_models import tiny_model

TOKEN_BYTES = {"llama": 2 * 2 * 2 * 16 * 4}  # layers x (K, V) x kv heads x head dim x float32


def budget(tokens: int) -> str:
    """A KV budget of `tokens` positions, 8 of which take padding rows' writes."""
    return str(tokens * TOKEN_BYTES["llama"])


def prompts(count: int, vocab: int, length: int, seed: int = 1) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(length)] for _ in range(count)]


# ---------------------------------------------------------------- extents


def test_extents_first_fit_merge_extend_shrink_and_compact():
    pool = ExtentAllocator(100)
    a, b, c = pool.allocate(30), pool.allocate(30), pool.allocate(30)
    assert (a.start, b.start, c.start) == (0, 30, 60) and pool.free == 10
    assert pool.allocate(11) is None
    pool.release(b)
    assert pool.holes == [(30, 30), (90, 10)]
    assert pool.extend(a, 50) and a.size == 50 and pool.holes == [(50, 10), (90, 10)]
    assert not pool.extend(a, 61)
    pool.shrink(a, 20)
    assert pool.holes == [(20, 40), (90, 10)]
    assert pool.allocate(45) is None and pool.free == 50
    moves = pool.compact([a, c])
    assert moves == [(60, 20, 30)] and c.start == 20 and pool.holes == [(50, 50)]
    pool.release(a)
    pool.release(c)
    assert pool.holes == [(0, 100)]


# ---------------------------------------------------------------- prefix index


class Holder:
    def __init__(self, tokens, namespace=0):
        self.kv_tokens = tokens
        self.kv_namespace = namespace


def test_prefix_index_finds_the_longest_computed_block_prefix_and_drops_superseded_entries():
    cache = PrefixCache()
    tokens = list(range(100, 150))
    entry = CachedPrefix(tokens[:40], Extent(0, 40))
    cache.keep(entry)
    assert cache.register(entry, 40) == []
    assert cache.lookup(tokens, limit=49) == (entry, 2 * BLOCK_TOKENS)
    assert cache.lookup(tokens, limit=20) == (entry, BLOCK_TOKENS)
    assert cache.lookup([7, *tokens[1:]], limit=49) == (None, 0)
    longer = Holder(tokens)
    orphans = cache.register(longer, 48)  # a running sequence that computed the same blocks and one more
    assert orphans == [entry] and not cache.entries, "an entry whose every block is held by another is freed"
    assert cache.lookup(tokens, limit=49) == (longer, 3 * BLOCK_TOKENS)
    cache.drop(longer)
    assert cache.lookup(tokens, limit=49) == (None, 0)


def test_prefix_index_keeps_each_lora_adapters_blocks_apart():
    cache = PrefixCache()
    tokens = list(range(100, 150))
    adapted, base = Holder(tokens, namespace=7), Holder(tokens)
    cache.register(adapted, 48)
    assert cache.lookup(tokens, limit=49) == (None, 0), "the base model never reads an adapter's K/V"
    assert cache.lookup(tokens, limit=49, namespace=8) == (None, 0), "nor does another adapter (or another load)"
    assert cache.lookup(tokens, limit=49, namespace=7) == (adapted, 3 * BLOCK_TOKENS)
    cache.register(base, 32)
    assert cache.lookup(tokens, limit=49) == (base, 2 * BLOCK_TOKENS)
    assert cache.lookup(tokens, limit=49, namespace=7) == (adapted, 3 * BLOCK_TOKENS)


# ---------------------------------------------------------------- the engine under a budget


@pytest.fixture(scope="module")
def llama(tokenizer):
    return tiny_model("llama", len(tokenizer), seed=21)


def recording_engine(model, tokenizer, steps: list, **settings):
    """An engine of 32 prompt tokens per step beside decoding rows that appends each step's spans to `steps`, as
    (the sequence's first prompt token, start, end)."""
    built = make_engine(model, tokenizer, max_num_batched_tokens=32, **settings)
    step = built.runner.step
    built.runner.step = lambda spans: steps.append([(s.seq.prompt_ids[0], s.start, s.end) for s in spans]) \
        or step(spans)
    return built


async def until_decoding(seq) -> None:
    while len(seq.output_ids) < 2:
        await asyncio.sleep(0.001)


def alone(model, tokenizer, prompt, params, **settings):
    return run_with_engine(lambda: make_engine(model, tokenizer, **settings),
                           lambda e: generate_all(e, [prompt], params))[0]


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_a_repeated_prefix_is_served_from_the_cache_with_the_same_output(llama, tokenizer, prefix_caching):
    system = prompts(1, len(tokenizer), 50, seed=2)[0]
    turns = [system + tail for tail in prompts(3, len(tokenizer), 9, seed=3)]

    async def one_after_another(engine):
        return [(await generate_all(engine, [p], greedy(12)))[0] for p in turns]

    seqs = run_with_engine(lambda: make_engine(llama, tokenizer, prefix_caching=prefix_caching), one_after_another)
    expected_hits = [0, 48, 48] if prefix_caching else [0, 0, 0]
    assert [s.cached_tokens for s in seqs] == expected_hits
    for seq, prompt in zip(seqs, turns):
        assert seq.output_ids == alone(llama, tokenizer, prompt, greedy(12), prefix_caching=False).output_ids


def test_a_follow_up_turn_reuses_the_previous_answer_too(llama, tokenizer):
    first = prompts(1, len(tokenizer), 30, seed=4)[0]

    async def two_turns(engine):
        reply = (await generate_all(engine, [first], greedy(20)))[0]
        follow_up = first + reply.output_ids + [5, 6, 7]
        return follow_up, (await generate_all(engine, [follow_up], greedy(8)))[0]

    follow_up, second = run_with_engine(lambda: make_engine(llama, tokenizer), two_turns)
    assert second.cached_tokens == 48  # 49 of its tokens were computed (the reply's last token never was)
    assert second.output_ids == alone(llama, tokenizer, follow_up, greedy(8), prefix_caching=False).output_ids


def test_least_recently_used_prefixes_are_evicted_within_a_tiny_budget(llama, tokenizer):
    many = prompts(8, len(tokenizer), 40, seed=5)

    async def fill(engine):
        for prompt in many:
            await generate_all(engine, [prompt], greedy(4))
        arena = engine.scheduler.memory
        assert arena.used_tokens <= arena.tokens == 160
        newest, oldest = await generate_all(engine, [many[-1] + [9], many[0] + [9]], greedy(2))
        return newest, oldest

    newest, oldest = run_with_engine(lambda: make_engine(llama, tokenizer, kv_cache_memory=budget(160)), fill)
    assert newest.cached_tokens == 32 and oldest.cached_tokens == 0


def test_admission_waits_for_memory_and_proceeds_when_it_frees(llama, tokenizer):
    first, second = prompts(2, len(tokenizer), 100, seed=6)
    observed = []

    async def both(engine):
        seqs = [engine.add(first, greedy(30)), engine.add(second, greedy(30))]
        while not seqs[0].finished:
            observed.append((engine.stats().running, engine.stats().waiting))
            await asyncio.sleep(0.001)
        return [await finish(engine, s) for s in seqs]

    done = run_with_engine(lambda: make_engine(llama, tokenizer, kv_cache_memory=budget(200), prefix_caching=False),
                           both)
    assert (1, 1) in observed and (2, 0) not in observed, "the second request waits while the first holds the memory"
    for seq, prompt in zip(done, (first, second)):
        assert len(seq.output_ids) == 30
        assert seq.output_ids == alone(llama, tokenizer, prompt, greedy(30)).output_ids


def test_running_out_while_decoding_preempts_the_youngest_and_resumes_it(llama, tokenizer):
    first, second = prompts(2, len(tokenizer), 20, seed=7)

    def engine():
        return make_engine(llama, tokenizer, kv_cache_memory=budget(200), prefix_caching=False)

    async def both(engine):
        seqs = await generate_all(engine, [first, second], greedy(100))
        return seqs, engine.scheduler.preemptions

    (a, b), preemptions = run_with_engine(engine, both)
    assert preemptions >= 1
    assert len(a.output_ids) == len(b.output_ids) == 100
    assert a.output_ids == alone(llama, tokenizer, first, greedy(100)).output_ids
    assert b.output_ids == alone(llama, tokenizer, second, greedy(100)).output_ids


def test_rows_outgrowing_a_static_slot_grow_and_preempt_as_without_one_and_free_their_memory(llama, tokenizer):
    """Rows that outgrow their slot of the static cache move to extents of the budget beside the slots, grown and
    preempted as every row is without one; a row that stays in its slot decodes beside them."""
    first, second = prompts(2, len(tokenizer), 20, seed=7)
    short = prompts(1, len(tokenizer), 5, seed=8)[0]

    def engine():
        slots = 5 * 96  # 4 rows and the padding slot
        return make_engine(llama, tokenizer, batch_size=4, static_cache=True, static_cache_decoder_max_length=96,
                           kv_cache_memory=budget(slots + 200), prefix_caching=False)

    async def three(engine):
        leaving_slots = record_rows_leaving_slots(engine)
        seqs = [engine.add(first, greedy(100)), engine.add(second, greedy(100)), engine.add(short, greedy(20))]
        done = [await finish(engine, seq) for seq in seqs]
        return done, leaving_slots, engine.scheduler.preemptions, engine.scheduler.memory

    (a, b, c), leaving_slots, preemptions, arena = run_with_engine(engine, three)
    # the second, preempted as it outgrew its slot, comes back as a long row: its first extent exceeds a slot
    assert leaving_slots == [a] and preemptions >= 1
    assert a.output_ids == alone(llama, tokenizer, first, greedy(100)).output_ids
    assert b.output_ids == alone(llama, tokenizer, second, greedy(100)).output_ids
    assert c.output_ids == alone(llama, tokenizer, short, greedy(20)).output_ids
    assert arena.used_tokens == 0 and arena.allocator.free == arena.tokens - arena.reserved.size


def test_a_request_that_can_never_fit_gets_a_400_with_the_numbers(llama, tokenizer):
    async def check(engine):
        service = TextService(engine, LoadedModel(llama, tokenizer, "tiny", 1024), ServingOptions(("tiny",)))
        with pytest.raises(APIError) as refused:
            service.sampling_params(CompletionRequest(model="tiny", prompt="x", max_tokens=150), 100)
        default = service.sampling_params(CompletionRequest(model="tiny", prompt="x", max_tokens=None), 100)
        return refused.value, default

    error, default = run_with_engine(lambda: make_engine(llama, tokenizer, kv_cache_memory=budget(208)), check)
    assert error.status == 400 and "200 tokens" in error.message and "100 prompt tokens plus 150" in error.message
    assert default.max_tokens == 100, "without max_tokens the completion may fill what the budget leaves"


def test_chunked_prefill_gives_the_tokens_of_a_single_prefill_and_keeps_decoding_flowing(llama, tokenizer):
    long_prompt, short_prompt = prompts(1, len(tokenizer), 150, seed=8)[0], [5, 6, 7]
    steps = []

    async def short_then_long(engine):
        short = engine.add(short_prompt, greedy(40))
        await until_decoding(short)
        long = engine.add(long_prompt, greedy(10))
        return [await finish(engine, s) for s in (short, long)]

    short, long = run_with_engine(lambda: recording_engine(llama, tokenizer, steps), short_then_long)
    long_spans = [(start, end) for step in steps for first, start, end in step if first == long_prompt[0]]
    assert long_spans[:5] == [(0, 32), (32, 64), (64, 96), (96, 128), (128, 150)]
    prefilling = [step for step in steps if any(first == long_prompt[0] and end <= 150 for first, _, end in step)]
    assert all(any(first == short_prompt[0] for first, _, _ in step) for step in prefilling), \
        "the running request decodes in every step of the long prompt's prefill"
    assert long.output_ids == alone(llama, tokenizer, long_prompt, greedy(10)).output_ids
    assert short.output_ids == alone(llama, tokenizer, short_prompt, greedy(40)).output_ids


def test_short_prompts_arriving_beside_a_decoding_row_fill_the_free_rows_at_once(llama, tokenizer):
    """Eight 10-token prompts arrive while one row decodes: beside it a step takes 32 prompt tokens plus one for
    each of the 15 rows the batch leaves free, whole prompts only, so four start in the first step (three
    fitted in 32 tokens before) and give the tokens they give alone."""
    arriving, running = prompts(8, len(tokenizer), 10, seed=13), [5, 6, 7]
    steps = []

    async def beside_one(engine):
        first = engine.add(running, greedy(30))
        await until_decoding(first)
        outputs = await generate_all(engine, arriving, greedy(4))
        await finish(engine, first)
        return outputs

    outputs = run_with_engine(lambda: recording_engine(llama, tokenizer, steps, batch_invariant=False,
                                                       prefix_caching=False), beside_one)
    firsts = {prompt[0] for prompt in arriving}
    admitted = next([(start, end) for first, start, end in step if first in firsts] for step in steps
                    if any(first in firsts for first, _, _ in step))
    assert admitted == [(0, 10)] * 4, steps
    assert [s.output_ids for s in outputs] == [alone(llama, tokenizer, p, greedy(4)).output_ids for p in arriving]


def test_sampling_seeds_survive_preemption(llama, tokenizer):
    """A preempted request keeps its generator: seeded sampling gives the same text as alone."""
    first, second = prompts(2, len(tokenizer), 20, seed=9)
    params = SamplingParams(max_tokens=100, temperature=1.0, seed=7)
    both = run_with_engine(lambda: make_engine(llama, tokenizer, kv_cache_memory=budget(200), prefix_caching=False),
                           lambda e: generate_all(e, [first, second], params))
    assert both[1].output_ids == alone(llama, tokenizer, second, params).output_ids


def test_by_default_a_prompt_alone_is_prefilled_at_once_and_beside_decoding_rows_in_small_chunks(llama, tokenizer):
    long_prompt, short_prompt = prompts(1, len(tokenizer), 150, seed=10)[0], [5, 6, 7]
    steps = []

    async def alone_then_beside(engine):
        await generate_all(engine, [long_prompt], greedy(2))
        alone = list(steps)
        steps.clear()
        short = engine.add(short_prompt, greedy(40))
        await until_decoding(short)
        await finish(engine, engine.add(long_prompt, greedy(2)))
        await finish(engine, short)
        return alone

    engine = None

    def keep(built):
        nonlocal engine
        engine = built
        return built

    alone = run_with_engine(lambda: keep(recording_engine(llama, tokenizer, steps, batch_invariant=False,
                                                          prefix_caching=False)), alone_then_beside)
    assert alone[0] == [(long_prompt[0], 0, 150)], "nothing else runs: the whole prompt in one step"
    beside = [(start, end) for step in steps for first, start, end in step if first == long_prompt[0] and end <= 150]
    assert [start for start, _ in beside[1:]] == [end for _, end in beside[:-1]] and beside[-1][1] == 150
    costs = [engine.scheduler._cost(start, end) for start, end in beside]
    assert all(cost <= 32 for cost in costs[:-1]) and costs[0] > 29, costs
    # the chunk that finishes the prompt may also take a token for each row the one decoding row leaves free
    assert costs[-1] <= 32 + engine.scheduler.max_running - 1, costs
    sizes = [end - start for start, end in beside]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] > sizes[-2], "later chunks attend to more: fewer tokens"


def test_chunks_are_sized_so_a_step_with_one_lasts_about_twice_the_decoding_rows_alone():
    sizer = ChunkSizer(most_tokens=64)
    for _ in range(4):
        sizer.observe(0.040, decoding_rows=8, prompt_cost=0)
        sizer.observe(0.010, decoding_rows=1, prompt_cost=0)
    assert sizer.tokens(8) == sizer.tokens(1) == 64, "nothing measured beside decoding rows yet: the most"
    for _ in range(20):  # a prompt cost unit adds 4 ms to the 40 ms of 8 rows: 10 units double the step
        sizer.observe(0.040 + 0.004 * sizer.tokens(8), decoding_rows=8, prompt_cost=sizer.tokens(8))
    assert sizer.tokens(8) == 10 == round((SLOWDOWN - 1) * 0.040 / 0.004)
    assert sizer.tokens(7) == 10, "the nearest row count measured alone"
    assert sizer.tokens(1) == FEWEST_TOKENS, "beside one row's 10 ms, 2.5 units: never below the floor"
    for _ in range(20):  # tokens grow cheap (two rows: the 10 ms measured at one row is the nearest)
        sizer.observe(0.010 + 0.0001 * sizer.tokens(2), decoding_rows=2, prompt_cost=sizer.tokens(2))
    assert sizer.tokens(2) == sizer.tokens(8) == 64, "cheap tokens: up to the most"


def test_chunks_are_timed_unless_the_step_tokens_are_set_or_batch_invariant(llama, tokenizer):
    assert engine_settings(Config(), torch.device("cpu")).timed_chunks
    assert not engine_settings(Config(max_num_batched_tokens=64), torch.device("cpu")).timed_chunks
    assert not engine_settings(Config(batch_invariant=True), torch.device("cpu")).timed_chunks
    timed = make_engine(llama, tokenizer, batch_invariant=False).scheduler
    assert timed.chunk_sizer is not None and timed.chunk_sizer.most_tokens == timed.step_tokens


def test_timed_chunks_stay_within_the_measured_budget_and_give_the_tokens_of_a_single_prefill(llama, tokenizer):
    long_prompt, short_prompt = prompts(1, len(tokenizer), 300, seed=12)[0], [5, 6, 7]
    chunks = []  # (the long prompt's chunk cost, the step's budget when planned) in steps beside a decoding row

    def recording(engine):
        plan = engine.scheduler.plan

        def recorded_plan():
            decoding_rows = sum(seq.decoding for seq in engine.scheduler.running)
            budget = engine.scheduler.chunk_sizer.tokens(decoding_rows)
            spans = plan()
            chunks.extend((engine.scheduler._cost(s.start, s.end), budget) for s in spans
                          if s.seq.prompt_ids[0] == long_prompt[0] and s.end < len(long_prompt) and len(spans) > 1)
            return spans
        engine.scheduler.plan = recorded_plan
        return engine

    async def beside_one(engine):
        short = engine.add(short_prompt, greedy(200))
        await until_decoding(short)
        long = engine.add(long_prompt, greedy(5))
        outputs = [await finish(engine, s) for s in (long, short)]
        return outputs

    long, short = run_with_engine(lambda: recording(make_engine(llama, tokenizer, batch_invariant=False,
                                                                prefix_caching=False)), beside_one)
    assert len(chunks) > 3 and all(cost <= budget for cost, budget in chunks), chunks
    assert long.output_ids == alone(llama, tokenizer, long_prompt, greedy(5), batch_invariant=False).output_ids
