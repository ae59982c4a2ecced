"""The speed path on tiny random-weight models: the static cache and its compiled decode step give the eager
engine's greedy tokens and never recompile while serving; HQQ quantises and generates (compiled too, as
--int8's layers do), in
bfloat16 on CPU through torch's int4 kernel with HQQ's own de-quantised weights; profiling writes traces;
--torch-dtype auto picks by the hardware."""

import asyncio
import json
import os
import random
import subprocess
import sys

import pytest
import torch
import transformers

from batching import ATTENTION_NAME, KVArena, Slots, kv_layout
from batching.attention import attend_decoding
from batching.build import attention_cost, leading_bits
from batching.static_decode import DecodeForward, bucket_sizes, compiled_per_bucket
from config import auto_dtype
from hqq.core.quantize import BaseQuantizeConfig, HQQLinear
from kernels import decode_attention

from converters.hqq import Int4Linear, quantize_linears
from converters.int8 import quantize_int8
from converters.linear_layers import weight_bytes, weight_count
from converters.packed_linear import PackedLinear, pack_linears
from model_manager import LoadedModel
from models import CompletionRequest
from serving.errors import APIError
from serving.text_service import ServingOptions, TextService
from tests.helpers.engine import (WarmUpRecord, finish, generate_all, greedy, make_engine, record_rows_leaving_slots,
                                  run_with_engine)
from tests.helpers.tiny_models import tiny_model


def random_prompts(count: int, vocab: int, seed: int, lengths=(3, 40)) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.randint(*lengths))] for _ in range(count)]


def outputs(model, tokenizer, prompts, max_tokens=16, **settings) -> list[list[int]]:
    def build():
        engine = make_engine(model, tokenizer, **settings)
        engine.runner.warm_up(lambda ready, total: None)
        return engine
    return [s.output_ids for s in run_with_engine(build, lambda e: generate_all(e, prompts, greedy(max_tokens)))]


def test_buckets_double_up_to_the_batch_size():
    assert bucket_sizes(20) == [1, 2, 4, 8, 16, 20]
    assert bucket_sizes(16, smallest=4) == [4, 8, 16]
    assert bucket_sizes(3, smallest=3) == [3]


def test_static_cache_gives_the_eager_engines_tokens_alone_and_batched(architecture, tokenizer):
    model = tiny_model(architecture, len(tokenizer), seed=3)
    prompts = random_prompts(12, len(tokenizer), seed=7)
    eager = outputs(model, tokenizer, prompts)
    static = dict(static_cache=True, static_cache_decoder_max_length=96, batch_size=8)
    assert outputs(model, tokenizer, prompts, **static) == eager
    assert [outputs(model, tokenizer, [p], **static)[0] for p in prompts[:3]] == eager[:3]


@pytest.mark.skipif(decode_attention.library() is None, reason="no C compiler: attend_rows does not serve")
def test_prompt_chunks_join_decoding_rows_in_the_static_step_and_keep_the_eager_tokens(tokenizer):
    """Outside batch-invariant mode, on CPU, a step of decoding rows beside prompt chunks (one token per row, each
    attending up to its own position) runs in the static step rather than all eagerly."""
    model = tiny_model("llama", len(tokenizer), seed=5)
    prompts = random_prompts(8, len(tokenizer), seed=9, lengths=(5, 60))
    eager = outputs(model, tokenizer, prompts, max_tokens=30)
    lengths = [6 + 3 * index for index in range(len(prompts))]  # rows free up one at a time for the next prompt
    kinds = []

    def build():
        engine = make_engine(model, tokenizer, batch_size=4, batch_invariant=False, static_cache=True,
                             static_cache_decoder_max_length=96, max_num_batched_tokens=16)
        static = engine.runner.static
        static_logits = static.logits
        static.logits = lambda spans: kinds.append({s.seq.decoding for s in spans}) or static_logits(spans)
        return engine

    async def staggered(engine):
        return await asyncio.gather(*(finish(engine, engine.add(p, greedy(n))) for p, n in zip(prompts, lengths)))

    served = run_with_engine(build, staggered)
    assert [s.output_ids for s in served] == [tokens[:n] for tokens, n in zip(eager, lengths)]
    assert {True, False} in kinds  # prompt chunks beside decoding rows


def test_the_slot_length_limits_no_request_the_context_and_the_kv_budget_do(tokenizer):
    """Issue 36: a 141-token prompt asking for 160 tokens was a 400 with static slots of 256 tokens."""
    model = tiny_model("llama", len(tokenizer))

    async def limits(engine):
        service = TextService(engine, LoadedModel(model, tokenizer, "tiny", 1024), ServingOptions(("tiny",)))
        served = service.sampling_params(CompletionRequest(model="tiny", prompt="x", max_tokens=160), 141)
        refused = []
        for prompt_tokens, max_tokens in ((1000, 100), (300, 200)):
            with pytest.raises(APIError) as error:
                service.sampling_params(CompletionRequest(model="tiny", prompt="x", max_tokens=max_tokens),
                                        prompt_tokens)
            refused.append(error.value)
        return served, refused

    slots = 5 * 64  # 4 rows and the padding slot
    served, (context, budget) = run_with_engine(lambda: make_engine(
        model, tokenizer, batch_size=4, static_cache=True, static_cache_decoder_max_length=64,
        kv_cache_memory=str((slots + 400) * 2 * 2 * 2 * 16 * 4)), limits)
    assert served.max_tokens == 160
    assert context.status == 400 and "maximum context length is 1024" in context.message
    assert "1000 prompt tokens plus 100" in context.message
    assert budget.status == 400 and "at most 400 tokens" in budget.message
    assert "300 prompt tokens plus 200" in budget.message


# prompts and max_tokens, in slots of 96: 1 (issue 36's 141 + 160), 3 and 7 are long rows from the start (their first
# extent exceeds a slot), 8 outgrows its slot for an extent; the others stay in their slots
LONG_AND_SHORT = ((5, 20), (141, 160), (9, 24), (70, 30), (12, 16), (40, 40), (7, 25), (100, 12), (10, 100))
ATTENTION = {"attend_rows": True, "slots, as on CUDA": False}


@pytest.mark.parametrize("mode, attention, batch_invariant", [
    ("static_cache", "attend_rows", False), ("static_cache", "slots, as on CUDA", True),
    ("static_cache", "slots, as on CUDA", False), ("torch_compile", "attend_rows", False)])
def test_requests_longer_than_a_slot_run_as_long_rows_beside_short_ones_with_the_eager_tokens(
        tokenizer, monkeypatch, mode, attention, batch_invariant):
    """Where the step's attention reads each row's keys wherever they lie (attend_rows), long rows join the static
    step beside rows in slots; where it reads rows by slot, steps holding long rows run packed. Their memory is
    freed after (but for prefix-cache entries)."""
    if ATTENTION[attention] and decode_attention.library() is None:
        pytest.skip("no C compiler: attend_rows does not serve")
    if not ATTENTION[attention]:
        monkeypatch.setattr(decode_attention, "serves", lambda *args: False)
    model = tiny_model("llama", len(tokenizer), seed=13)
    rng = random.Random(14)
    prompts = [[rng.randrange(3, len(tokenizer)) for _ in range(length)] for length, _ in LONG_AND_SHORT]
    eager = outputs(model, tokenizer, prompts, max_tokens=160, batch_size=4)
    static_steps, built, leaving_slots = [], [], []
    warm_up = WarmUpRecord()

    @warm_up.warmed
    def build():
        engine = make_engine(model, tokenizer, batch_size=4, batch_invariant=batch_invariant,
                             static_cache_decoder_max_length=96, max_num_batched_tokens=16, **{mode: True})
        static, arena = engine.runner.static, engine.scheduler.memory
        static_logits = static.logits
        static.logits = lambda spans: static_steps.append({arena.has_slot(s.seq) for s in spans}) \
            or static_logits(spans)
        built.append(engine)
        leaving_slots.append(record_rows_leaving_slots(engine))
        return engine

    async def all_at_once(engine):
        return await asyncio.gather(*(finish(engine, engine.add(p, greedy(n)))
                                      for p, (_, n) in zip(prompts, LONG_AND_SHORT)))

    served = run_with_engine(build, all_at_once)
    assert [s.output_ids for s in served] == [tokens[:n] for tokens, (_, n) in zip(eager, LONG_AND_SHORT)]
    if mode == "torch_compile":
        warm_up.assert_complete_and_never_recompiled()
    if ATTENTION[attention]:
        assert {True, False} in static_steps  # long rows beside rows in slots in one static step
    else:
        assert all(kinds == {True} for kinds in static_steps)  # a step holding a long row runs packed...
        assert static_steps or not batch_invariant  # ...but for the rows in slots in batch-invariant mode
    assert [len(seq.prompt_ids) for seq in leaving_slots[0]] == [10]
    arena = built[0].scheduler.memory
    assert arena.rows_used == arena.rows_in_slots == 0 and arena.used_tokens == arena.cached_tokens > 0


@pytest.mark.parametrize("batch_invariant", [True, False], ids=["invariant", "prompts-join-the-static-step"])
def test_compiled_decode_step_matches_eager_and_never_recompiles_while_serving(tokenizer, batch_invariant):
    model = tiny_model("llama", len(tokenizer), seed=11)
    prompts = random_prompts(10, len(tokenizer), seed=12, lengths=(2, 50))
    eager = outputs(model, tokenizer, prompts, max_tokens=24, batch_size=6)
    warm_up = WarmUpRecord()
    build = warm_up.warmed(lambda: make_engine(model, tokenizer, batch_size=6, torch_compile=True,
                                               static_cache_decoder_max_length=96, batch_invariant=batch_invariant))

    async def varied(engine):
        """Joins mid-stream, a cancellation, batches of every size."""
        streams = []
        for index, prompt in enumerate(prompts):
            streams.append(asyncio.create_task(finish(engine, engine.add(prompt, greedy(24)))))
            if index == 3:
                doomed = engine.add(prompts[0], greedy(24))
                await asyncio.sleep(0.01)
                engine.cancel(doomed)
            if index % 3 == 0:
                await streams[-1]
        return [(await stream).output_ids for stream in streams]

    served = run_with_engine(build, varied)
    warm_up.assert_complete_and_never_recompiled()
    assert served == eager


def hqq_sized_model(vocab: int, dtype: torch.dtype = torch.float32) -> transformers.PreTrainedModel:
    """Linear layers large enough for quantisation to matter against the embeddings."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=256, intermediate_size=768, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                      tie_word_embeddings=True)
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation=ATTENTION_NAME).to(dtype).eval()


# float32 layers de-quantise on the fly; bfloat16 layers on CPU run torch's int4 kernel
HQQ_LAYERS = {torch.float32: HQQLinear, torch.bfloat16: Int4Linear}


@pytest.mark.parametrize("dtype", list(HQQ_LAYERS))
def test_hqq_quantises_every_linear_but_the_head_and_generates(tokenizer, dtype):
    model = hqq_sized_model(1000, dtype)
    linears = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    before = weight_bytes(model)
    report = quantize_linears(model, nbits=4, group_size=64)
    assert report.layers == linears - 1 and isinstance(model.lm_head, torch.nn.Linear)
    assert sum(isinstance(m, HQQ_LAYERS[dtype]) for m in model.modules()) == report.layers
    assert report.bytes_before == before and report.bytes_after < 0.55 * before
    seqs = run_with_engine(lambda: make_engine(model, tokenizer, context_length=512),
                           lambda e: generate_all(e, random_prompts(3, 1000, seed=1), greedy(8)))
    assert all(len(s.output_ids) == 8 and all(0 <= t < 1000 for t in s.output_ids) for s in seqs)


needs_onednn_bfloat16 = pytest.mark.skipif(not torch.ops.mkldnn._is_mkldnn_bf16_supported(),
                                           reason="this CPU lacks oneDNN's bfloat16 support")
CONVERSIONS = {"hqq float32": (torch.float32, lambda m: quantize_linears(m, nbits=4, group_size=64)),
               "hqq bfloat16": (torch.bfloat16, lambda m: quantize_linears(m, nbits=4, group_size=64)),
               "packed bfloat16": (torch.bfloat16, pack_linears)}


@pytest.mark.parametrize("conversion", [pytest.param(name, marks=needs_onednn_bfloat16) if "packed" in name else name
                                        for name in CONVERSIONS])
def test_converting_linear_layers_leaves_the_prompt_chunking_cost_model_alone(conversion):
    """The scheduler's attention cost per earlier token is relative to the linear layers' weights, which
    quantised or packed layers no longer hold as parameters: counted wrongly, a prompt got one token per step."""
    dtype, convert = CONVERSIONS[conversion]
    model = hqq_sized_model(1000, dtype)
    layout = kv_layout(model)
    before = attention_cost(model, layout, weight_count(model))
    convert(model)
    assert attention_cost(model, layout, weight_count(model)) == pytest.approx(before)


def test_the_int4_kernel_multiplies_by_hqqs_own_dequantised_weights():
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 96, bias=True).to(torch.bfloat16)
    params = BaseQuantizeConfig(nbits=4, group_size=64, axis=1)
    dequantised = HQQLinear(linear, params, compute_dtype=torch.bfloat16, device="cpu", del_orig=False)
    kernel = Int4Linear(linear, params["weight_quant_params"])
    x = torch.randn(2, 3, 256, dtype=torch.bfloat16)
    with torch.inference_mode():
        expected, got, unquantised = dequantised(x).float(), kernel(x).float(), linear(x).float()
    assert got.shape == (2, 3, 96)
    # one bfloat16 rounding of the offsets apart, where quantisation itself moves outputs ten times further
    assert (got - expected).abs().max() < 0.1 * (unquantised - expected).abs().max()


def test_layers_the_int4_kernel_cannot_take_fall_back_to_dequantising():
    model = hqq_sized_model(1000, torch.bfloat16)
    model.model.layers[0].mlp.down_proj = torch.nn.Linear(768, 200, bias=False).to(torch.bfloat16)  # 200 % 16 != 0
    report = quantize_linears(model, nbits=4, group_size=64)
    assert isinstance(model.model.layers[0].mlp.down_proj, HQQLinear)
    assert "CPU int4 kernel for 13, de-quantised on the fly for 1" in report.describe()


QUANTISATIONS = {"hqq float32": (torch.float32, lambda m: quantize_linears(m, nbits=4, group_size=64)),
                 "hqq bfloat16": (torch.bfloat16, lambda m: quantize_linears(m, nbits=4, group_size=64)),
                 "int8 float32": (torch.float32, quantize_int8), "int8 bfloat16": (torch.bfloat16, quantize_int8)}


def two_row_decode_step(model: transformers.PreTrainedModel) -> tuple[DecodeForward, tuple[torch.Tensor, ...]]:
    """The model's static decode step over random K/V in four slots of 32, and its inputs for two rows (slots 0 and
    1, at positions 3 and 7)."""
    arena = KVArena(kv_layout(model), 5 * 32, slots=Slots(4, 32))
    for tensor in (*arena.keys, *arena.values):
        tensor.normal_()
    ids, positions = torch.tensor([5, 6]), torch.tensor([3, 7])
    arguments = (ids, positions, positions + 1, torch.tensor([3, 32 + 7]), torch.tensor([0, 32]))
    return DecodeForward(model, arena), arguments


@pytest.mark.parametrize("quantisation", list(QUANTISATIONS))
def test_quantised_layers_compile_to_the_same_logits(quantisation):
    dtype, quantise = QUANTISATIONS[quantisation]
    model = hqq_sized_model(1000, dtype)
    quantise(model)
    forward, arguments = two_row_decode_step(model)
    with torch.inference_mode():
        eager = forward(*arguments).float()
        compiled = torch.compile(forward, dynamic=False)(*arguments).float()
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(compiled, eager, atol=tolerance, rtol=tolerance)


def test_the_compiled_step_traces_one_decoder_layer_and_stamps_out_the_others(architecture, tokenizer):
    """Dynamo traces the first decoder layer and calls its graph for every other (batching.layer_regions), each call
    with its own layer's weights and K/V: every layer calls one subgraph, and the logits are the eager step's (a
    layer stamped out with the first layer's weights, as torch did for a layer captured in a closure, is not)."""
    model = tiny_model(architecture, len(tokenizer), seed=5)
    forward, arguments = two_row_decode_step(model)
    graphs = []

    def keep_graph(graph: torch.fx.GraphModule, example_inputs: list) -> torch.fx.GraphModule:
        graphs.append(graph)
        return graph

    with torch.inference_mode():
        eager = forward(*arguments)
        compiled = torch.compile(forward, dynamic=False, backend=keep_graph)(*arguments)
    calls = [node for graph in graphs for node in graph.graph.nodes
             if node.target is torch.ops.higher_order.invoke_subgraph]
    assert len(calls) == model.config.num_hidden_layers
    assert len({node.args[1] for node in calls}) == 1  # the subgraph's identifier
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)


def test_the_compiled_step_rounds_bfloat16_where_the_eager_step_rounds():
    """Compiled as the server compiles it, a prompt laid one token per row (each attending up to its own position)
    writes the eager step's K/V to the bit in bfloat16, and the same logits: inductor's fused kernels otherwise keep
    their intermediates in float32, drift an ulp a layer from the eager step and transformers, and so flipped the
    embedded model's first answer token, a near-tie ("L'Étoile..." for "The capital of France is Paris")."""
    model = hqq_sized_model(1000, torch.bfloat16)
    with torch.no_grad():
        for parameter in model.parameters():  # values whose roundings differ when the arithmetic's order does
            parameter.normal_(std=0.5)
    tokens = 24
    arenas = [KVArena(kv_layout(model), 2 * 32, slots=Slots(1, 32)) for _ in range(2)]
    positions = torch.arange(tokens)
    arguments = (torch.randint(3, 1000, (tokens,)), positions, positions + 1, positions.clone(),
                 torch.zeros(tokens, dtype=torch.long))
    with torch.inference_mode():
        eager = DecodeForward(model, arenas[0])(*arguments)
        compiled = compiled_per_bucket(DecodeForward(model, arenas[1]), "default", [tokens], "test step")(*arguments)
    for eager_layer, compiled_layer in zip([*arenas[0].keys, *arenas[0].values], [*arenas[1].keys, *arenas[1].values]):
        assert torch.equal(eager_layer[:, :tokens], compiled_layer[:, :tokens])
    torch.testing.assert_close(compiled, eager, atol=0, rtol=2 ** -7)  # a bfloat16 ulp: the head's own rounding


def test_models_compiled_in_one_process_each_keep_their_own_graphs():
    """The compiled step checks no guard on the modules: a second model of the same shapes but another norm epsilon
    (a number the graph holds as a constant) must get graphs of its own, not run the first model's."""
    steps = []
    for epsilon in (1e-6, 10.0):
        model = hqq_sized_model(1000)
        for module in model.modules():
            if hasattr(module, "variance_epsilon"):
                module.variance_epsilon = epsilon
        arena = KVArena(kv_layout(model), 2 * 32, slots=Slots(1, 32))
        steps.append((DecodeForward(model, arena), arena))
    positions = torch.tensor([9])
    arguments = (torch.tensor([5]), positions, positions + 1, positions.clone(), torch.tensor([0]))
    with torch.inference_mode():
        for forward, arena in steps:
            for tensor in (*arena.keys, *arena.values):
                tensor.normal_(generator=torch.Generator().manual_seed(1))
            eager = forward(*arguments)
            compiled = compiled_per_bucket(forward, "default", [1], "test step")(*arguments)
            torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=1e-4)


@needs_onednn_bfloat16
@pytest.mark.parametrize("bias", [False, True])
def test_a_packed_layer_multiplies_as_the_plain_one(bias):
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 96, bias=bias).to(torch.bfloat16)
    packed = PackedLinear(linear)
    with torch.inference_mode():
        for x in (torch.randn(1, 256), torch.randn(37, 256), torch.randn(2, 3, 256)):
            x = x.to(torch.bfloat16)
            torch.testing.assert_close(packed(x), linear(x))
            torch.testing.assert_close(torch.compile(packed, dynamic=False)(x), linear(x))


@needs_onednn_bfloat16
def test_bfloat16_models_on_cpu_pack_every_linear_but_the_head_and_keep_their_tokens(tokenizer):
    model = hqq_sized_model(1000, torch.bfloat16)
    prompts = random_prompts(3, 1000, seed=2)
    plain = run_with_engine(lambda: make_engine(model, tokenizer, context_length=512, static_cache=True),
                            lambda e: generate_all(e, prompts, greedy(8)))
    linears = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert pack_linears(model) == linears - 1 and isinstance(model.lm_head, torch.nn.Linear)
    assert sum(isinstance(m, PackedLinear) for m in model.modules()) == linears - 1
    packed = run_with_engine(lambda: make_engine(model, tokenizer, context_length=512, static_cache=True),
                             lambda e: generate_all(e, prompts, greedy(8)))
    assert [s.output_ids for s in packed] == [s.output_ids for s in plain]
    assert pack_linears(hqq_sized_model(1000, torch.float32)) == 0  # float32 keeps MKL's products


def test_profiling_writes_a_trace_per_profiled_step_and_a_summary(tokenizer, tmp_path):
    model = tiny_model("qwen2", len(tokenizer))
    folder = tmp_path / "profiles"

    async def run(engine):
        await generate_all(engine, random_prompts(1, len(tokenizer), seed=3, lengths=(10, 20)), greedy(6))
        await engine.stop()

    run_with_engine(lambda: make_engine(model, tokenizer, torch_profiling=True, torch_profiling_dir=str(folder),
                                        torch_profiling_steps=3), run)
    traces = sorted(folder.glob("step-*.json"))
    assert [t.name.split("-")[1] for t in traces] == ["001", "002", "003"]
    assert "prefill-1seq" in traces[0].name and "decode-1seq-1tok" in traces[-1].name
    assert any(event.get("name") == "aten::mm" for event in json.loads(traces[0].read_text())["traceEvents"])
    summary = (folder / "summary.txt").read_text()
    assert "top operators over 3 profiled steps" in summary and "aten::" in summary


@pytest.mark.parametrize("device, flags, expected", [
    ("cuda", set(), "bfloat16"),
    ("cpu", {"avx", "avx2", "fma"}, "float32"),
    ("cpu", {"avx2", "avx512f", "avx512_bf16"}, "bfloat16"),
    ("cpu", {"avx2", "amx_tile", "amx_bf16"}, "bfloat16"),
])
def test_auto_dtype_is_bfloat16_only_where_the_hardware_multiplies_it(device, flags, expected):
    dtype, reason = auto_dtype(device, flags)
    assert dtype == expected and reason


@pytest.mark.parametrize("mask_kind", ["none", "lengths", "bias"])
def test_decoding_attention_in_bfloat16_agrees_with_sdpa_in_float32(mask_kind):
    """On CPU, bfloat16 decoding attention takes plain products (transformers' eager arithmetic) instead of SDPA:
    it agrees with SDPA run in float32 on the same values to bfloat16's precision; float32 stays on SDPA."""
    torch.manual_seed(0)
    query, keys, values = (torch.randn(shape).to(torch.bfloat16) for shape in
                           ((6, 3, 2, 64), (6, 3, 100, 64), (6, 3, 100, 64)))
    attended = torch.arange(100) < torch.tensor([1, 17, 50, 64, 99, 100])[:, None]
    mask = {"none": None, "lengths": attended[:, None, None, :],
            "bias": torch.randn(6, 3, 2, 100).masked_fill(~attended[:, None, None, :], float("-inf"))}[mask_kind]
    ours = attend_decoding(query, keys, values, mask, 0.125)
    exact = torch.nn.functional.scaled_dot_product_attention(query.float(), keys.float(), values.float(),
                                                               attn_mask=mask, scale=0.125)
    assert ours.dtype == torch.bfloat16
    torch.testing.assert_close(ours.float(), exact, atol=2e-2, rtol=2e-2)
    float32 = attend_decoding(query.float(), keys.float(), values.float(), mask, 0.125)
    assert torch.equal(float32, exact)


COMPILE_ONCE = """
import json, sys
import torch
from torch._dynamo.utils import counters
from tests.helpers.engine import make_engine
from tests.helpers.tiny_models import byte_tokenizer, tiny_model

tokenizer = byte_tokenizer()
engine = make_engine(tiny_model("llama", len(tokenizer), seed=3), tokenizer, batch_size=2, batch_invariant=False,
                     torch_compile=True, model_cache_dir=sys.argv[1])
engine.runner.warm_up(lambda ready, buckets: None)
print(json.dumps({"graphs": len(engine.runner.static.buckets), "traced": counters["stats"]["unique_graphs"],
                  "lowered": counters["aot_autograd"]["total"]}))
"""


def test_a_second_start_loads_the_compiled_steps_from_the_disk_cache(tmp_path):
    """What makes a second start with --torch-compile quick: the first process traces and compiles each bucket's
    step and saves it under --model-cache-dir, the second loads every one of them, tracing nothing. Steps of
    another key that no start used for a week are removed."""
    unused = tmp_path / "torch-compile" / "steps" / "step-0123456789ab"
    unused.mkdir(parents=True)
    os.utime(unused, (0, 0))
    environment = {name: value for name, value in os.environ.items() if name != "TORCHINDUCTOR_CACHE_DIR"}
    runs = [json.loads(subprocess.run([sys.executable, "-c", COMPILE_ONCE, str(tmp_path)], env=environment,
                                      capture_output=True, text=True, check=True).stdout.splitlines()[-1])
            for _ in range(2)]
    graphs = runs[0]["graphs"]
    assert graphs == 3, "rows 1 and 2, and prompt chunks beside them"
    assert runs[0]["traced"] == runs[0]["lowered"] == graphs, runs
    assert runs[1]["traced"] == runs[1]["lowered"] == 0, runs
    assert len(list(tmp_path.glob("torch-compile/steps/step-*/rows-*.pt2"))) == graphs
    assert not unused.exists()


def test_a_budget_from_free_memory_keeps_four_leading_bits():
    assert leading_bits(248113, 4) == 0b1111 << 14 == leading_bits(250001, 4)
    assert leading_bits(15, 4) == 15 and leading_bits(0, 4) == 0
    assert all(count * 7 / 8 <= leading_bits(count, 4) <= count for count in range(1, 5000))
