"""int8 x int8 -> int32 products on CPUs with AVX512-VNNI through int8_matmul.c: the same integers as
`torch._int_mm`, from weights packed once for the kernel (see pack_weight). Where it does not run (another
device, no AVX512-VNNI, no C compiler, an input size that 4 does not divide) the caller keeps torch._int_mm."""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from kernels.build import built_library

SOURCE = Path(__file__).with_name("int8_matmul.c")
LANES = 16  # output columns of a packed block, as int8_matmul.c's
GROUP = 4  # input features a vpdpbusd lane sums
ACTIVATION_OFFSET = 128  # the kernel multiplies activations as unsigned bytes: a + 128


@functools.cache
def library() -> ctypes.CDLL | None:
    loaded = built_library(SOURCE, "torch._int_mm")
    if loaded is None or not loaded.int8_matmul_available():
        return None
    pointer, integer = ctypes.c_void_p, ctypes.c_int64
    loaded.int8_matmul.argtypes = [pointer, integer, integer, pointer, pointer, integer, pointer, ctypes.c_int]
    loaded.int8_matmul.restype = None
    return loaded


def runs_here(weight: torch.Tensor) -> bool:
    """Whether this [out, in] int8 weight can be packed for the kernel on this machine."""
    return weight.device.type == "cpu" and weight.shape[1] % GROUP == 0 and library() is not None


def pack_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An [out, in] int8 weight as the kernel reads it, [ceil(out / 16), in / 4, 16, 4] (zero rows pad the last
    block), and its compensation: 128 x each output's weight sum, int32, padded alike."""
    out_features, in_features = weight.shape
    padded = torch.nn.functional.pad(weight, (0, 0, 0, -out_features % LANES))
    packed = padded.reshape(-1, LANES, in_features // GROUP, GROUP).permute(0, 2, 1, 3).contiguous()
    compensation = ACTIVATION_OFFSET * padded.sum(dim=1, dtype=torch.int32)
    return packed, compensation


def int8_matmul(activations: torch.Tensor, packed: torch.Tensor, compensation: torch.Tensor,
                out_features: int) -> torch.Tensor:
    """activations: [rows, in] int8; returns [rows, out_features] int32, activations . weight^T exactly."""
    if torch.compiler.is_compiling():
        return int8_matmul_op(activations, packed, compensation, out_features)
    return _int8_matmul(activations, packed, compensation, out_features)  # eagerly, without the op's dispatch


def _int8_matmul(activations: torch.Tensor, packed: torch.Tensor, compensation: torch.Tensor,
                 out_features: int) -> torch.Tensor:
    activations = activations.contiguous()
    rows, in_features = activations.shape
    if packed.shape[1:] != (in_features // GROUP, LANES, GROUP) or packed.shape[0] * LANES < out_features:
        raise ValueError(f"int8_matmul: activations of {in_features} features against weights packed as "
                         f"{tuple(packed.shape)} for {out_features} outputs")
    output = torch.empty(rows, out_features, dtype=torch.int32)
    library().int8_matmul(activations.data_ptr(), rows, in_features, packed.data_ptr(), compensation.data_ptr(),
                          out_features, output.data_ptr(), torch.get_num_threads())
    return output


# for torch.compile: an op that compiled graphs call as it is
int8_matmul_op = torch.library.custom_op("batchwise::int8_matmul", _int8_matmul, mutates_args=())


@int8_matmul_op.register_fake
def _int8_matmul_shape(activations: torch.Tensor, packed: torch.Tensor, compensation: torch.Tensor,
                       out_features: int) -> torch.Tensor:
    return activations.new_empty(activations.shape[0], out_features, dtype=torch.int32)
