"""Next-token choice for a whole batch on the device, each row with its own settings and generator."""

from __future__ import annotations

import torch

from batching.sequence import Sequence


def sample(logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
    """logits: [rows, vocab] float32, one row per sequence."""
    device = logits.device
    temperature = torch.tensor([s.params.temperature for s in seqs], device=device)
    greedy = temperature == 0
    if bool(greedy.all()):
        return logits.argmax(dim=-1).tolist()
    scaled = logits / torch.where(greedy, 1.0, temperature).unsqueeze(1)
    top_p = torch.tensor([s.params.top_p for s in seqs], device=device)
    if bool((top_p < 1).any()):
        scaled = _apply_top_p(scaled, top_p)
    probs = scaled.softmax(dim=-1)
    noise = torch.empty_like(probs)
    for row, seq in enumerate(seqs):
        noise[row].exponential_(generator=seq.generator)
    # argmax(p / E) with E ~ Exp(1) draws from p (the exponential race), one generator per row
    sampled = (probs / noise).argmax(dim=-1)
    return torch.where(greedy, logits.argmax(dim=-1), sampled).tolist()


def _apply_top_p(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    sorted_probs = sorted_logits.softmax(dim=-1)
    outside = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p.unsqueeze(1)
    sorted_logits = sorted_logits.masked_fill(outside, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)
