"""--int8 (converters.int8) on tiny random-weight models: a layer is the integer product of its quantised
inputs, a row's result is its own whatever the batch, every linear layer and the LM head are converted, and
the engine's greedy tokens are transformers' over the same quantised model, decoders and encoder-decoders."""

import copy

import pytest
import torch

from config import Config, ConfigError
from converters.int8 import INT8_LEVELS, Int8Linear, quantize_int8
from converters.linear_layers import replace_linears, weight_bytes
from kernels import int8_linear
from model_manager import LoadedModel
from tests.helpers.engine import generate_all, greedy, make_engine, run_with_engine
from tests.helpers.tiny_models import tiny_model, tiny_seq2seq
from tests.unit.test_encoder_decoder import (ARCHITECTURES, DECODER_LENGTH, ENCODER_LENGTH, engine_for, joining,
                                             prompts, transformers_greedy)
from tests.unit.test_speed_path import random_prompts


def test_a_layer_is_the_integer_product_of_its_quantised_inputs():
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 40)
    x = torch.randn(2, 5, 96)
    rows, weight = x.reshape(-1, 96), linear.weight.detach()
    row_scale = rows.abs().amax(1, keepdim=True) / INT8_LEVELS
    weight_scale = weight.abs().amax(1) / INT8_LEVELS
    integers = torch.round(rows / row_scale).long() @ torch.round(weight / weight_scale[:, None]).long().T
    expected = integers.double() * row_scale.double() * weight_scale.double() + linear.bias.detach().double()
    with torch.inference_mode():
        got, unquantised = Int8Linear(linear)(x), linear(x)
    torch.testing.assert_close(got.reshape(-1, 40).double(), expected, rtol=1e-5, atol=1e-5)
    assert (got - unquantised).norm() < 0.02 * unquantised.norm()  # quantisation moves outputs by a percent


def test_a_bias_of_another_dtype_than_the_weight_is_added_as_torch_adds_it():
    torch.manual_seed(2)
    linear = torch.nn.Linear(64, 48).to(torch.bfloat16)
    linear.bias = torch.nn.Parameter(torch.randn(48))  # float32 beside bfloat16 weights
    unbiased = copy.deepcopy(linear)
    unbiased.bias = None
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    with torch.inference_mode():
        got = Int8Linear(linear)(x)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, Int8Linear(unbiased)(x) + linear.bias)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_rows_result_does_not_depend_on_the_other_rows(dtype):
    torch.manual_seed(1)
    layer = Int8Linear(torch.nn.Linear(64, 48).to(dtype))
    x = torch.randn(9, 64, dtype=dtype) * torch.linspace(0.1, 10, 9, dtype=dtype)[:, None]
    with torch.inference_mode():
        assert torch.equal(layer(x), torch.cat([layer(row[None]) for row in x]))


def test_every_linear_layer_and_the_head_become_int8_and_greedy_tokens_are_transformers_argmax(tokenizer):
    vocab = len(tokenizer)
    model = tiny_model("llama", vocab, seed=4)
    linears = sum(isinstance(module, torch.nn.Linear) for module in model.modules())
    report = quantize_int8(model)
    assert report.layers + 1 == linears == sum(isinstance(module, Int8Linear) for module in model.modules())
    assert isinstance(model.get_output_embeddings(), Int8Linear)
    reference = copy.deepcopy(model)
    reference.set_attn_implementation("sdpa")
    prompts = random_prompts(4, vocab, seed=5, lengths=(5, 30))
    seqs = run_with_engine(lambda: make_engine(model, tokenizer), lambda engine: generate_all(engine, prompts,
                                                                                              greedy(12)))
    for seq in seqs:
        ids = torch.tensor([seq.prompt_ids + seq.output_ids])
        with torch.inference_mode():
            logits = reference(ids).logits[0, len(seq.prompt_ids) - 1:-1]
        chosen = logits.gather(1, torch.tensor(seq.output_ids)[:, None])[:, 0]
        assert torch.all(logits.max(dim=1).values - chosen <= 1e-4), seq.output_ids


@pytest.mark.skipif(int8_linear.library() is None, reason="no AVX512-VNNI or no C compiler: torch's product serves")
@pytest.mark.parametrize("architecture", ["llama", "qwen2"])  # qwen2's query, key and value have biases
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layers_that_read_one_input_share_one_product_and_keep_their_bits(architecture, dtype):
    model = tiny_model(architecture, 1000, seed=6).to(dtype)
    model.set_attn_implementation("sdpa")
    separate = copy.deepcopy(model)
    replace_linears(separate, Int8Linear)
    separate.set_output_embeddings(Int8Linear(separate.get_output_embeddings()))
    assert "4 groups of layers that read one input fused" in quantize_int8(model).describe()  # 2 a layer
    attention = model.model.layers[0].self_attn
    assert attention.q_proj.shared is attention.k_proj.shared is attention.v_proj.shared is not None
    assert weight_bytes(model) == weight_bytes(separate)  # the layers' weights are views of the shared ones
    ids = torch.randint(3, 1000, (2, 9))
    with torch.inference_mode():
        assert torch.equal(model(ids).logits, separate(ids).logits)
        assert torch.equal(torch.compile(model, dynamic=False)(ids).logits,
                           torch.compile(separate, dynamic=False)(ids).logits)
    assert all(module.shared.output is None for module in model.modules() if getattr(module, "shared", None))


def test_int8_is_one_quantisation_at_a_time():
    with pytest.raises(ConfigError, match="choose one"):
        Config(int8=True, hqq=True).validate()


@pytest.mark.parametrize("architecture", ["t5", "bart"])
def test_int8_encoder_decoders_decode_as_transformers_does(architecture):
    """The encoder-decoder runner drives the quantised layers step by step: its greedy tokens are generate's."""
    model, tokenizer = tiny_seq2seq(architecture, seed=ARCHITECTURES.index(architecture))
    quantize_int8(model)
    loaded = LoadedModel(model, tokenizer, architecture, DECODER_LENGTH, ENCODER_LENGTH)
    budgets = [20, 12, 15]
    outputs = run_with_engine(engine_for(loaded), joining(loaded, budgets))
    assert outputs == [transformers_greedy(loaded, prompt, tokens)
                       for prompt, tokens in zip(prompts(loaded, len(budgets)), budgets)]
