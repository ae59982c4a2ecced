"""The AVX512-VNNI int8 product (kernels/int8_matmul.c) against exact integer arithmetic: every row count
around its 8-row tiles and 128-row chunks, output counts that 16 does not divide, the full byte range, eagerly
and inside a compiled graph; and --int8's layers use it where it runs."""

from pathlib import Path

import pytest
import torch

from converters.int8 import Int8Linear
from kernels.int8_matmul import int8_matmul, library, pack_weight, runs_here

VNNI = "avx512_vnni" in Path("/proc/cpuinfo").read_text()
pytestmark = pytest.mark.skipif(not VNNI, reason="the CPU has no AVX512-VNNI: --int8 keeps torch._int_mm")


def exact(activations: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return (activations.long() @ weight.long().T).int()


def random_bytes(*shape: int, seed: int) -> torch.Tensor:
    return torch.randint(-128, 128, shape, dtype=torch.int8, generator=torch.Generator().manual_seed(seed))


def test_it_is_built_on_this_machine():
    assert library() is not None


@pytest.mark.parametrize("rows", [1, 7, 8, 9, 32, 129, 300])
@pytest.mark.parametrize(("in_features", "out_features"), [(4, 1), (64, 16), (96, 40), (576, 49), (1536, 192)])
def test_products_are_exact(rows, in_features, out_features):
    weight = random_bytes(out_features, in_features, seed=out_features)
    activations = random_bytes(rows, in_features, seed=rows)
    packed, compensation = pack_weight(weight)
    assert torch.equal(int8_matmul(activations, packed, compensation, out_features), exact(activations, weight))


def test_extreme_bytes_stay_exact():
    weight = torch.tensor([[-128] * 64, [127] * 64, [-127, 127] * 32], dtype=torch.int8)
    activations = torch.tensor([[-128] * 64, [127] * 64, [0] * 64], dtype=torch.int8)
    packed, compensation = pack_weight(weight)
    assert torch.equal(int8_matmul(activations, packed, compensation, 3), exact(activations, weight))


def test_a_compiled_graph_calls_it_as_an_op():
    weight, activations = random_bytes(48, 64, seed=1), random_bytes(5, 64, seed=2)
    packed, compensation = pack_weight(weight)
    compiled = torch.compile(lambda a: int8_matmul(a, packed, compensation, 48) * 2, fullgraph=True)
    assert torch.equal(compiled(activations), exact(activations, weight) * 2)


def test_misshapen_inputs_are_refused():
    packed, compensation = pack_weight(random_bytes(16, 64, seed=3))
    with pytest.raises(ValueError, match="packed"):
        int8_matmul(random_bytes(2, 32, seed=4), packed, compensation, 16)


def test_int8_layers_use_it_where_it_runs():
    packed_layer, odd_layer = Int8Linear(torch.nn.Linear(64, 40)), Int8Linear(torch.nn.Linear(66, 40))
    assert runs_here(torch.zeros(40, 64, dtype=torch.int8)) and packed_layer.compensation is not None
    assert odd_layer.compensation is None and odd_layer.weight.shape == (66, 40)  # torch._int_mm's input-major
