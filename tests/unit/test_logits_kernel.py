"""The C kernel for each row's argmax and logsumexp of next-token logits (kernels/logits.c) against
torch's own: the first of equal largest values, tokens ruled out (-inf), vocabularies of any size."""

import pytest
import torch

from kernels.logits import argmax_logsumexp, library


def test_it_is_built_on_this_machine():
    assert library() is not None  # else every other test here would only check torch against itself


@pytest.mark.parametrize("vocab", [1, 7, 16, 33, 49152, 51865])
def test_each_row_as_torch_finds_it(vocab):
    logits = torch.randn(5, vocab, generator=torch.Generator().manual_seed(vocab))
    logits[0, vocab // 2:] = logits[0].max() + 1  # ties: the first of them wins
    logits[1, ::3] = float("-inf")
    argmax, logsumexp = argmax_logsumexp(logits)
    assert torch.equal(argmax, logits.argmax(dim=-1))
    torch.testing.assert_close(logsumexp, torch.logsumexp(logits, dim=-1))


def test_rows_with_nothing_possible_or_one_token_left():
    logits = torch.full((2, 100), float("-inf"))
    logits[1, 42] = 3.0
    argmax, logsumexp = argmax_logsumexp(logits)
    assert argmax.tolist() == [0, 42] and logsumexp.tolist() == [float("-inf"), 3.0]


def test_argmax_alone_and_other_dtypes_through_torch():
    logits = torch.randn(3, 1000)
    argmax, logsumexp = argmax_logsumexp(logits, with_logsumexp=False)
    assert logsumexp is None and torch.equal(argmax, logits.argmax(dim=-1))
    halves = logits.bfloat16()
    argmax, logsumexp = argmax_logsumexp(halves)
    assert torch.equal(argmax, halves.argmax(dim=-1)) and torch.equal(logsumexp, torch.logsumexp(halves, dim=-1))
