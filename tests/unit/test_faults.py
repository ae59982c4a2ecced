"""Fault isolation on a tiny model, driven by failpoints: a failing row fails alone and the others' greedy
output is what it is without it; running out of memory preempts and only the request that cannot run alone
fails; a step past the step timeout stops the engine with its reason."""

import asyncio

import pytest

from batching.failpoints import parse_failpoints
from tests.helpers.engine import finish, greedy, make_engine, run_with_engine
from tests.helpers.tiny_models import tiny_model
from tests.unit.test_speed_path import random_prompts


async def outcome(engine, seq) -> tuple[list[int], str]:
    """The sequence's tokens and the error of its last delta ('' when it finished well)."""
    last = None
    async for delta in engine.stream(seq):
        last = delta
    return seq.output_ids, last.error if last.finish_reason == "error" else ""


def serve(model, tokenizer, prompts, poisoned: dict[str, list[int]], **settings):
    """Every prompt (users '') and the poisoned ones (by user) together; (outcomes, then a fresh request's)."""
    async def body(engine):
        seqs = [engine.add(p, greedy(12)) for p in prompts[:4]]
        seqs += [engine.add(p, greedy(12), user=user) for user, p in poisoned.items()]
        seqs += [engine.add(p, greedy(12)) for p in prompts[4:]]
        results = await asyncio.gather(*(outcome(engine, s) for s in seqs))
        after = await finish(engine, engine.add(prompts[0], greedy(12)))
        return results, after.output_ids, engine.scheduler.preemptions

    return run_with_engine(lambda: make_engine(model, tokenizer, batch_size=16, **settings), body)


@pytest.fixture(scope="module")
def tiny(tokenizer):
    return tiny_model("llama", len(tokenizer), seed=21)


@pytest.fixture(scope="module")
def prompts(tokenizer):
    return random_prompts(8, len(tokenizer), seed=22)


@pytest.fixture(scope="module")
def alone(tiny, tokenizer, prompts):
    return [serve(tiny, tokenizer, [p], {})[0][0][0] for p in prompts]


@pytest.mark.parametrize("static", [False, True])
def test_a_failing_row_fails_alone_and_the_others_generate_as_without_it(tiny, tokenizer, prompts, alone, static):
    poisoned = {"poison": prompts[1][:5], "bad": prompts[2][:7]}
    results, after, _ = serve(tiny, tokenizer, prompts, poisoned, static_cache=static,
                              failpoints="decode:poison:error,prefill:bad:error")
    survivors = results[:4] + results[6:]
    assert [tokens for tokens, _ in survivors] == alone and all(not error for _, error in survivors)
    (poison_tokens, poison_error), (bad_tokens, bad_error) = results[4:6]
    assert poison_error == "failpoint decode:poison:error" and len(poison_tokens) == 1  # failed at its first decode
    assert bad_error == "failpoint prefill:bad:error" and bad_tokens == []
    assert after == alone[0]


def test_out_of_memory_preempts_and_only_what_cannot_run_alone_fails(tiny, tokenizer, prompts, alone, caplog):
    results, after, preemptions = serve(tiny, tokenizer, prompts, {"big": prompts[3][:9]},
                                        failpoints="prefill:big:oom")
    survivors = results[:4] + results[5:]
    assert [tokens for tokens, _ in survivors] == alone and all(not error for _, error in survivors)
    big_tokens, big_error = results[4]
    assert big_tokens == [] and big_error.startswith("out of memory running this request alone")
    assert preemptions > 0 and "out of memory in a step" in caplog.text
    assert after == alone[0]


def test_a_step_past_the_timeout_stops_the_engine_with_its_reason(tiny, tokenizer, prompts):
    async def body(engine):
        healthy = engine.add(prompts[0], greedy(50))
        hung = engine.add(prompts[1], greedy(5), user="stuck")
        results = await asyncio.gather(outcome(engine, healthy), outcome(engine, hung))
        return results, await engine.stopped(), engine.alive

    results, fault, alive = run_with_engine(
        lambda: make_engine(tiny, tokenizer, step_timeout=0.5, failpoints="decode:stuck:hang"), body)
    assert "step timeout of 0.5 s" in fault and not alive
    assert all(error.startswith("the engine stopped") for _, error in results)


@pytest.mark.parametrize("text", ["decode:x", "encode:x:error", "decode::error", "prefill:x:explode"])
def test_malformed_failpoints_are_refused(text):
    with pytest.raises(ValueError, match="STAGE:USER:KIND"):
        parse_failpoints(text)
