"""The C decode-attention kernel (kernels) against attention computed in float64 by torch: every row's
query heads over exactly its own keys, whatever its neighbours; and the guards that keep C from reading past
the K/V memory."""

import pytest
import torch

from batching.attention import attend_cache_rows
from kernels.decode_attention import attend_rows, runs_here


def reference(query, keys, values, starts, lengths, scale):
    """attend_rows' contract, in float64 with torch's own products and softmax."""
    kv_heads, group = keys.shape[0], query.shape[1] // keys.shape[0]
    rows = []
    for row, (start, length) in enumerate(zip(starts.tolist(), lengths.tolist())):
        k, v = (cache[:, start:start + length].double() for cache in (keys, values))
        q = query[row].double().reshape(kv_heads, group, -1)
        rows.append(((q @ k.transpose(1, 2) * scale).softmax(-1) @ v).reshape(query.shape[1:]))
    return torch.stack(rows)


def arena(kv_heads, tokens, dim, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(kv_heads, tokens, dim, generator=generator).to(dtype) for _ in range(2)]


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("heads,kv_heads,dim", [(9, 3, 64), (4, 4, 128), (8, 2, 32), (6, 1, 80)])
def test_each_row_attends_to_exactly_its_own_keys(dtype, tolerance, heads, kv_heads, dim):
    keys, values = arena(kv_heads, 700, dim, dtype)
    lengths = torch.tensor([1, 15, 16, 17, 100, 257, 33])  # around the kernel's blocks of 16 keys
    starts = torch.tensor([0, 1, 40, 100, 150, 260, 600])  # extents anywhere in the arena, overlapping too
    query = torch.randn(len(lengths), heads, dim).to(dtype)
    ours = attend_rows(query, keys, values, starts, lengths, dim ** -0.5)
    assert ours.dtype == dtype and ours.shape == query.shape
    torch.testing.assert_close(ours.double(), reference(query, keys, values, starts, lengths, dim ** -0.5),
                               atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_rows_result_does_not_depend_on_the_rest_of_the_batch(dtype):
    keys, values = arena(3, 32 * 64, 64, dtype)
    query = torch.randn(32, 9, 64).to(dtype)
    starts, lengths = torch.arange(32) * 64, torch.randint(1, 65, (32,), generator=torch.Generator().manual_seed(1))
    together = attend_rows(query, keys, values, starts, lengths, 0.125)
    for row in (0, 7, 31):
        alone = attend_rows(query[row:row + 1], keys, values, starts[row:row + 1], lengths[row:row + 1], 0.125)
        assert torch.equal(alone[0], together[row])


def test_keys_outside_the_memory_or_none_at_all_are_refused():
    keys, values = arena(2, 100, 64, torch.float32)
    for start, length in ((90, 11), (-1, 5), (0, 0)):
        with pytest.raises(ValueError, match="1 or more keys within the 100 tokens"):
            attend_rows(torch.randn(1, 2, 64), keys, values, torch.tensor([start]), torch.tensor([length]), 0.125)
    with pytest.raises(ValueError, match="tokens contiguous"):
        attend_rows(torch.randn(1, 2, 64), keys.transpose(1, 2), values.transpose(1, 2), torch.tensor([0]),
                    torch.tensor([1]), 0.125)


def test_it_serves_cpu_tensors_of_its_dtypes_and_head_sizes_only():
    assert runs_here(torch.empty(1, 2, 64)) and runs_here(torch.empty(1, 2, 64, dtype=torch.bfloat16))
    assert not runs_here(torch.empty(1, 2, 64, dtype=torch.float16))
    assert not runs_here(torch.empty(1, 2, 72))  # not a multiple of 16 floats


def test_a_compiled_graph_calls_it_as_it_is():
    keys, values = arena(3, 256, 64, torch.bfloat16)
    query = torch.randn(4, 9, 64).to(torch.bfloat16)
    starts, lengths = torch.arange(4) * 64, torch.tensor([1, 9, 64, 30])
    compiled = torch.compile(lambda *args: attend_rows(*args, 0.125) * 2, fullgraph=True, dynamic=False)
    assert torch.equal(compiled(query, keys, values, starts, lengths),
                       attend_rows(query, keys, values, starts, lengths, 0.125) * 2)


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_a_row_cache_is_read_row_by_row_through_a_view_of_its_first_rows_and_positions(dtype, tolerance):
    """As Whisper's self- and cross-attention read their [rows, heads, positions, dim] caches: several queries
    (beams) may share a row, each attends to its own length of it."""
    cache_keys, cache_values = (torch.randn(6, 4, 300, 64).to(dtype) for _ in range(2))
    keys, values = cache_keys[:3, :, :200], cache_values[:3, :, :200]  # a view, as cross_rows gives
    rows, lengths = torch.tensor([0, 0, 1, 2, 2]), torch.tensor([200, 17, 1, 64, 199])
    query = torch.randn(5, 8, 1, 64).to(dtype)
    ours = attend_cache_rows(query, keys, values, rows, lengths, 0.125)
    assert ours.shape == (5, 1, 8, 64)
    expected = torch.stack([
        reference(query[i, :, 0][None], keys[row], values[row], torch.tensor([0]), lengths[i:i + 1], 0.125)[0]
        for i, row in enumerate(rows.tolist())])
    torch.testing.assert_close(ours[:, 0].double(), expected, atol=tolerance, rtol=tolerance)
