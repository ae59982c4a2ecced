"""The AVX512-VNNI int8 layer (kernels/int8_linear.c) against the torch operations it replaces, bit for bit:
every row count around its 8-row tiles and 128-row chunks, output counts that 16 does not divide, float32 and
bfloat16, with and without a bias, the full byte range, eagerly and inside a compiled graph; and --int8's
layers use it where it runs."""

from pathlib import Path

import pytest
import torch

from converters.int8 import INT8_LEVELS, SMALLEST_SCALE, Int8Linear
from kernels.int8_linear import int8_linear, library, pack_weight, runs_here

VNNI = "avx512_vnni" in Path("/proc/cpuinfo").read_text()
pytestmark = pytest.mark.skipif(not VNNI, reason="the CPU has no AVX512-VNNI: --int8 keeps torch._int_mm")


def torch_layer(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None
                ) -> torch.Tensor:
    """Int8Linear's torch operations, with exact integer products."""
    row_scale = x.abs().amax(dim=1, keepdim=True).float().clamp(min=SMALLEST_SCALE) / INT8_LEVELS
    quantised = torch.round(x / row_scale).to(torch.int8)
    product = (quantised.long() @ weight.long().T).int()
    output = (product * row_scale * scale).to(x.dtype)
    return output if bias is None else output + bias


def layer_inputs(rows: int, in_features: int, out_features: int, dtype: torch.dtype, seed: int):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randint(-127, 128, (out_features, in_features), dtype=torch.int8, generator=generator)
    scale = torch.rand(out_features, generator=generator) / 100
    bias = torch.randn(out_features, generator=generator).to(dtype)
    x = (torch.randn(rows, in_features, generator=generator) * torch.rand(rows, 1, generator=generator) * 10).to(dtype)
    return x, weight, scale, bias


def test_it_is_built_on_this_machine():
    assert library() is not None


@pytest.mark.parametrize("rows", [1, 7, 8, 9, 32, 129, 300])
@pytest.mark.parametrize(("in_features", "out_features"), [(4, 1), (64, 16), (96, 40), (576, 49), (1536, 192)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_same_bits_as_torch(rows, in_features, out_features, dtype):
    x, weight, scale, bias = layer_inputs(rows, in_features, out_features, dtype, seed=rows * out_features)
    packed, compensation = pack_weight(weight)
    for with_bias in (None, bias):
        assert torch.equal(int8_linear(x, packed, compensation, scale, with_bias),
                           torch_layer(x, weight, scale, with_bias))


def test_extreme_values_stay_exact():
    weight = torch.tensor([[-128] * 64, [127] * 64, [-127, 127] * 32], dtype=torch.int8)
    x = torch.tensor([[-1e30] * 64, [3.0] * 64, [0.0] * 64, [-0.5, 0.5] * 32, [1e-30] * 64])
    scale = torch.ones(3)
    packed, compensation = pack_weight(weight)
    assert torch.equal(int8_linear(x, packed, compensation, scale, None), torch_layer(x, weight, scale, None))


def test_a_compiled_graph_calls_it_as_an_op():
    x, weight, scale, bias = layer_inputs(5, 64, 48, torch.float32, seed=1)
    packed, compensation = pack_weight(weight)
    compiled = torch.compile(lambda a: int8_linear(a, packed, compensation, scale, bias) * 2, fullgraph=True)
    assert torch.equal(compiled(x), torch_layer(x, weight, scale, bias) * 2)


def test_misshapen_inputs_are_refused():
    x, weight, scale, bias = layer_inputs(2, 64, 16, torch.float32, seed=2)
    packed, compensation = pack_weight(weight)
    with pytest.raises(ValueError, match="packed"):
        int8_linear(x[:, :32], packed, compensation, scale, bias)
    with pytest.raises(ValueError, match="packed"):
        int8_linear(x, packed, compensation, scale, bias.bfloat16())


def test_int8_layers_use_it_where_it_runs():
    packed_layer, odd_layer = Int8Linear(torch.nn.Linear(64, 40)), Int8Linear(torch.nn.Linear(66, 40))
    assert runs_here(torch.zeros(40, 64, dtype=torch.int8), torch.float32) and packed_layer.compensation is not None
    assert odd_layer.compensation is None and odd_layer.weight.shape == (66, 40)  # torch._int_mm's input-major
    half = Int8Linear(torch.nn.Linear(64, 40).half())
    assert half.compensation is None  # the kernel reads float32 and bfloat16
