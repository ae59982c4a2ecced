"""The kernels as torch operators (batchwise::<name>), which compiled graphs call as they are. Defined on
torch.library's plain Library rather than torch.library.custom_op: a call costs ~10 us instead of ~12.5, and a
compiled decode step makes some 240 of them."""

from __future__ import annotations

from typing import Callable

import torch

LIBRARY = torch.library.Library("batchwise", "FRAGMENT")


def kernel_op(schema: str, kernel: Callable[..., torch.Tensor], shape: Callable[..., torch.Tensor]) -> Callable:
    """The op `schema` names (e.g. "f(Tensor x, float s) -> Tensor"), computed by `kernel`; `shape` makes its
    result's empty tensor while a graph is traced. Returns a function that calls the op inside a graph being
    compiled and `kernel` itself otherwise (the op's dispatch costs ~7 us a call)."""
    name = schema.split("(")[0]
    LIBRARY.define(schema)
    LIBRARY.impl(name, kernel, "CompositeExplicitAutograd")
    torch.library.register_fake(f"batchwise::{name}", shape, lib=LIBRARY)
    op = getattr(torch.ops.batchwise, name).default

    def call(*args: object) -> torch.Tensor:
        return op(*args) if torch.compiler.is_compiling() else kernel(*args)
    return call
