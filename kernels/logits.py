"""Each row's argmax and logsumexp of next-token logits on CPU through logits.c (torch's own where it does not
run: other devices and dtypes, or no C compiler)."""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from kernels.build import built_library

SOURCE = Path(__file__).with_name("logits.c")


@functools.cache
def library() -> ctypes.CDLL | None:
    loaded = built_library(SOURCE, "torch.argmax and torch.logsumexp")
    if loaded is not None:
        pointer, integer = ctypes.c_void_p, ctypes.c_int64
        loaded.argmax_logsumexp_f32.argtypes = [pointer, integer, integer, pointer, pointer, ctypes.c_int]
        loaded.argmax_logsumexp_f32.restype = None
    return loaded


def argmax_logsumexp(logits: torch.Tensor, with_logsumexp: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """logits: [rows, vocab]; returns each row's argmax (int64, the first of equals) and, when asked, its
    logsumexp (float32)."""
    if logits.device.type != "cpu" or logits.dtype != torch.float32 or library() is None:
        return logits.argmax(dim=-1), torch.logsumexp(logits, dim=-1) if with_logsumexp else None
    logits = logits.contiguous()
    rows, vocab = logits.shape
    argmax = torch.empty(rows, dtype=torch.long)
    logsumexp = torch.empty(rows, dtype=torch.float32) if with_logsumexp else None
    library().argmax_logsumexp_f32(logits.data_ptr(), rows, vocab, argmax.data_ptr(),
                                   None if logsumexp is None else logsumexp.data_ptr(), torch.get_num_threads())
    return argmax, logsumexp
