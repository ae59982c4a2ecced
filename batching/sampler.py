"""Next-token choice for a whole batch on the device, each row with its own settings and generator.

Logprobs reported to clients are the model's own (log-softmax of the raw logits); penalties, bias
and temperature shape only the choice. On CPU each row's argmax and logsumexp come from one C kernel
(kernels/logits.c): torch's take nearly 3x as long, and a step samples 32 rows of a large vocabulary."""

from __future__ import annotations

import torch

from batching.sequence import Sequence, TokenLogprob
from kernels.logits import argmax_logsumexp


def sample(logits: torch.Tensor, seqs: list[Sequence]) -> list[TokenLogprob]:
    """logits: [rows, vocab] float32, one row per sequence."""
    greedy_tokens, logsumexp = argmax_logsumexp(logits)
    shaped = logits
    if any(s.params.penalised or s.banned_token_ids for s in seqs):
        shaped = apply_penalties(shaped, seqs)
    if any(s.constraint for s in seqs):
        shaped = apply_grammars(shaped, seqs)
    if shaped is not logits:
        greedy_tokens = argmax_logsumexp(shaped, with_logsumexp=False)[0]
    tokens = choose(shaped, greedy_tokens, seqs)
    return token_logprobs(logits, tokens.tolist(), [s.params.logprobs or 0 for s in seqs], logsumexp)


def choose(logits: torch.Tensor, greedy_tokens: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """Each row's token: its greedy token (given: the logits' argmax), or one drawn by its own settings."""
    sampling = [row for row, s in enumerate(seqs) if not s.params.greedy]
    if not sampling:
        return greedy_tokens
    rows = torch.tensor(sampling, device=logits.device)
    picked = [seqs[row] for row in sampling]
    scaled = logits[rows] / column([s.params.temperature for s in picked], logits)
    scaled = filter_candidates(scaled, picked)
    probs = scaled.softmax(dim=-1)
    noise = torch.empty_like(probs)
    for index, seq in enumerate(picked):
        noise[index].exponential_(generator=seq.generator)
    # argmax(p / E) with E ~ Exp(1) draws from p (the exponential race), one generator per row
    return greedy_tokens.index_put((rows,), (probs / noise).argmax(dim=-1))


def filter_candidates(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """Top-k, then top-p, then min-p: each row keeps only its candidates."""
    masked = float("-inf")
    top_k = [s.params.top_k for s in seqs]
    if any(k > 0 for k in top_k):
        vocab = logits.shape[-1]
        k = column([k if k > 0 else vocab for k in top_k], logits, torch.long)
        kth = logits.sort(dim=-1, descending=True).values.gather(1, k.clamp(max=vocab) - 1)
        logits = logits.masked_fill(logits < kth, masked)
    top_p = [s.params.top_p for s in seqs]
    if any(p < 1.0 for p in top_p):
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(dim=-1)
        outside = sorted_probs.cumsum(dim=-1) - sorted_probs >= column(top_p, logits)
        logits = logits.scatter(1, order, sorted_logits.masked_fill(outside, masked))
    min_p = [s.params.min_p for s in seqs]
    if any(p > 0 for p in min_p):
        probs = logits.softmax(dim=-1)
        logits = logits.masked_fill(probs < column(min_p, logits) * probs.max(dim=-1, keepdim=True).values, masked)
    return logits


def apply_penalties(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    logits = logits.clone()
    for row, seq in enumerate(seqs):
        p = seq.params
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(seq.prompt_ids + seq.output_ids, device=logits.device).unique()
            values = logits[row, seen]
            logits[row, seen] = torch.where(values > 0, values / p.repetition_penalty, values * p.repetition_penalty)
        if (p.presence_penalty or p.frequency_penalty) and seq.output_ids:
            ids, counts = torch.tensor(seq.output_ids, device=logits.device).unique(return_counts=True)
            logits[row, ids] -= p.frequency_penalty * counts + p.presence_penalty
        if p.logit_bias:
            ids, biases = zip(*p.logit_bias)
            logits[row, list(ids)] += torch.tensor(biases, device=logits.device)
        banned = seq.banned_token_ids
        if banned:
            logits[row, list(banned)] = float("-inf")
    return logits


BIT_SHIFTS = torch.arange(32, dtype=torch.int32)


def apply_grammars(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """Rule out, in each constrained row, every token its grammar forbids next; other rows are untouched."""
    rows = [row for row, s in enumerate(seqs) if s.constraint]
    vocab = logits.shape[-1]
    words = (vocab + 31) // 32
    bitmask = torch.empty(len(rows), words, dtype=torch.int32)
    for index, row in enumerate(rows):
        seqs[row].constraint.write_mask(bitmask[index].data_ptr(), words * 4)
    allowed = ((bitmask[:, :, None] >> BIT_SHIFTS) & 1).view(len(rows), words * 32)[:, :vocab].bool()
    constrained = torch.tensor(rows, device=logits.device)
    masked = logits[constrained].masked_fill(~allowed.to(logits.device), float("-inf"))
    return logits.index_put((constrained,), masked)


def token_logprobs(logits: torch.Tensor, token_ids: list[int], top_counts: list[int],
                   logsumexp: torch.Tensor | None = None) -> list[TokenLogprob]:
    """Each row's logprob of its token (its logit less the row's logsumexp: log-softmax for the few entries
    reported), with that row's `top_counts[row]` most likely alternatives."""
    if logsumexp is None:
        logsumexp = torch.logsumexp(logits, dim=-1)
    ids = torch.tensor(token_ids, device=logits.device)[:, None]
    chosen = (logits.gather(1, ids)[:, 0] - logsumexp).tolist()
    most = max(top_counts, default=0)
    if most == 0:
        return [TokenLogprob(t, lp) for t, lp in zip(token_ids, chosen)]
    values, ids = (logits - logsumexp[:, None]).topk(most, dim=-1)
    return [TokenLogprob(t, lp, tuple(zip(i[:count], v[:count])))
            for t, lp, i, v, count in zip(token_ids, chosen, ids.tolist(), values.tolist(), top_counts)]


def column(values: list, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    return torch.tensor(values, device=like.device, dtype=dtype or like.dtype)[:, None]
