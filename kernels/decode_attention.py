"""Decode attention on CPU through decode_attention.c: every decoding row's query heads over exactly that row's
cached keys, all rows in one call. In the static step it replaces products over the whole fixed-length slot
with a mask (which read every row's full slot, and paid oneDNN's per-matrix overhead once per row and KV
head); in the packed eager step it replaces one SDPA call per decoding row.

Built at first use (kernels.build); without it the callers keep their torch paths."""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from kernels.build import built_library
from kernels.ops import kernel_op

SOURCE = Path(__file__).with_name("decode_attention.c")
FUNCTIONS = {torch.bfloat16: "attend_rows_bf16", torch.float32: "attend_rows_f32"}
LANES = 16  # as decode_attention.c's


@functools.cache
def library() -> ctypes.CDLL | None:
    loaded = built_library(SOURCE, "decode attention runs as torch products")
    if loaded is None:
        return None
    pointer, integer = ctypes.c_void_p, ctypes.c_int64
    for name in FUNCTIONS.values():
        function = getattr(loaded, name)
        function.argtypes = [pointer] * 5 + [integer] * 6 + [ctypes.c_float, pointer, ctypes.c_int]
        function.restype = ctypes.c_int
    return loaded


@torch.compiler.assume_constant_result  # a compiled graph asks once, while it is traced
def built() -> bool:
    return library() is not None


def runs_here(query: torch.Tensor) -> bool:
    """Whether attend_rows serves this query on this machine."""
    return serves(query.device, query.dtype, query.shape[-1])


def serves(device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    """Whether attend_rows serves attention heads of `head_dim` in `dtype` on `device` on this machine: a CPU, a
    dtype the kernel has, a head size that its 16-float vectors divide."""
    return device.type == "cpu" and dtype in FUNCTIONS and head_dim % LANES == 0 and built()


def attend_rows(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, starts: torch.Tensor,
                lengths: torch.Tensor, scale: float) -> torch.Tensor:
    """query: [rows, heads, dim]; keys, values: [kv_heads, tokens, dim], tokens contiguous within a head (the KV
    arena's layer); starts, lengths: [rows] (int64), row i attends to tokens starts[i] .. starts[i] + lengths[i]
    of every KV head, its query heads grouped as transformers' repeat_kv groups them. Returns [rows, heads, dim]."""
    return attend_rows_op(query, keys, values, starts, lengths, scale)


def _attend_rows(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, starts: torch.Tensor,
                 lengths: torch.Tensor, scale: float) -> torch.Tensor:
    query, starts, lengths = query.contiguous(), starts.contiguous(), lengths.contiguous()
    if keys.stride()[1:] != (keys.shape[2], 1) or keys.stride() != values.stride():
        raise ValueError(f"attend_rows needs tokens contiguous within a head, got strides {keys.stride()} and "
                         f"{values.stride()}")
    rows, heads, dim = query.shape
    output = torch.empty_like(query)
    # C reads where it is told: never before the start or past the end, and at least one key (its softmax's)
    if getattr(library(), FUNCTIONS[query.dtype])(
            query.data_ptr(), keys.data_ptr(), values.data_ptr(), starts.data_ptr(), lengths.data_ptr(), rows, heads,
            keys.shape[0], dim, keys.stride(0), keys.shape[1], scale, output.data_ptr(), torch.get_num_threads()):
        raise ValueError(f"attend_rows: every row needs 1 or more keys within the {keys.shape[1]} tokens there are")
    return output


def row_cache_as_tokens(cache: torch.Tensor) -> tuple[torch.Tensor, int]:
    """A row cache's K or V ([rows, kv_heads, length, dim], or a view of its first rows and positions) as the
    [kv_heads, tokens, dim] attend_rows reads, and the tokens between rows: row r's positions are tokens
    r x that on."""
    rows, kv_heads, length, dim = cache.shape
    per_row = cache.stride(0) // dim
    return cache.as_strided((kv_heads, (rows - 1) * per_row + length, dim), (cache.stride(1), dim, 1)), per_row


def _attend_rows_shape(query: torch.Tensor, *_: object) -> torch.Tensor:
    return torch.empty_like(query)


attend_rows_op = kernel_op("attend_rows(Tensor query, Tensor keys, Tensor values, Tensor starts, Tensor lengths, "
                           "float scale) -> Tensor", _attend_rows, _attend_rows_shape)
