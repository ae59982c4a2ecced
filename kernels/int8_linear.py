"""An --int8 linear layer on CPUs with AVX512-VNNI through int8_linear.c: per-row quantisation, exact int32
products and scaling back in one call, the same bits as Int8Linear's torch operations, from weights packed
once for the kernel (see pack_weight). Where it does not run (another device or dtype, no AVX512-VNNI, no C
compiler, an input size that 4 does not divide) the layer keeps its torch operations and torch._int_mm."""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from kernels.build import built_library
from kernels.ops import kernel_op

SOURCE = Path(__file__).with_name("int8_linear.c")
LANES = 16  # outputs of a packed block, as int8_linear.c's
GROUP = 4  # input features a vpdpbusd lane sums
ACTIVATION_OFFSET = 128  # the kernel multiplies activations as unsigned bytes: q + 128
DTYPES = (torch.float32, torch.bfloat16)


@functools.cache
def library() -> ctypes.CDLL | None:
    loaded = built_library(SOURCE, "torch._int_mm", exact_math=True)
    if loaded is None or not loaded.int8_linear_available():
        return None
    pointer, integer = ctypes.c_void_p, ctypes.c_int64
    loaded.int8_linear.argtypes = [pointer, ctypes.c_int, integer, integer, pointer, pointer, pointer, pointer,
                                   integer, pointer, ctypes.c_int]
    loaded.int8_linear.restype = None
    return loaded


def runs_here(weight: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether an [out, in] weight of a layer computing in `dtype` can be packed for the kernel here."""
    return weight.device.type == "cpu" and dtype in DTYPES and weight.shape[1] % GROUP == 0 and library() is not None


def pack_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An [out, in] int8 weight as the kernel reads it, [ceil(out / 16), in / 4, 16, 4] (zero rows pad the last
    block), and its compensation: 128 x each output's weight sum, int32, padded alike."""
    out_features, in_features = weight.shape
    padded = torch.nn.functional.pad(weight, (0, 0, 0, -out_features % LANES))
    packed = padded.reshape(-1, LANES, in_features // GROUP, GROUP).permute(0, 2, 1, 3).contiguous()
    compensation = ACTIVATION_OFFSET * padded.sum(dim=1, dtype=torch.int32)
    return packed, compensation


def int8_linear(x: torch.Tensor, packed: torch.Tensor, compensation: torch.Tensor, scale: torch.Tensor,
                bias: torch.Tensor | None) -> torch.Tensor:
    """x: [rows, in] float32 or bfloat16; returns [rows, out] in x's dtype, out = scale's length."""
    return int8_linear_op(x, packed, compensation, scale, bias)


def _int8_linear(x: torch.Tensor, packed: torch.Tensor, compensation: torch.Tensor, scale: torch.Tensor,
                 bias: torch.Tensor | None) -> torch.Tensor:
    x = x.contiguous()
    (rows, in_features), out_features = x.shape, scale.shape[0]
    if (packed.shape[1:] != (in_features // GROUP, LANES, GROUP) or packed.shape[0] * LANES < out_features
            or x.dtype not in DTYPES or (bias is not None and (bias.dtype, bias.shape) != (x.dtype, scale.shape))):
        raise ValueError(f"int8_linear: {x.dtype} inputs of {in_features} features against weights packed as "
                         f"{tuple(packed.shape)} for {out_features} outputs")
    output = torch.empty(rows, out_features, dtype=x.dtype)
    library().int8_linear(x.data_ptr(), x.dtype == torch.bfloat16, rows, in_features, packed.data_ptr(),
                          compensation.data_ptr(), scale.data_ptr(), None if bias is None else bias.data_ptr(),
                          out_features, output.data_ptr(), torch.get_num_threads())
    return output


def _int8_linear_shape(x: torch.Tensor, packed: torch.Tensor, compensation: torch.Tensor, scale: torch.Tensor,
                       bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty(x.shape[0], scale.shape[0])


int8_linear_op = kernel_op("int8_linear(Tensor x, Tensor packed, Tensor compensation, Tensor scale, Tensor? bias) "
                           "-> Tensor", _int8_linear, _int8_linear_shape)
