"""Batched sampling: each row's own settings shape only its own choice."""

import math

import torch

from batching import SamplingParams, Sequence, TokenLogprob
from batching.detokenizer import IncrementalDetokenizer
from batching.sampler import apply_penalties, filter_candidates, sample

VOCAB = 8
EOS = 7


def seq(prompt=(1, 2), outputs=(), seed=0, tokenizer=None, **params) -> Sequence:
    s = Sequence(list(prompt), SamplingParams(max_tokens=100, **params), IncrementalDetokenizer(tokenizer, []),
                 frozenset({EOS}))
    s.output_ids = list(outputs)
    s.generator = torch.Generator().manual_seed(seed)
    return s


def logits_row(*values) -> torch.Tensor:
    return torch.tensor([list(values)], dtype=torch.float32)


def test_greedy_rows_take_the_argmax_and_report_model_logprobs():
    logits = torch.randn(3, VOCAB)
    seqs = [seq(temperature=0.0, logprobs=3) for _ in range(3)]
    result = sample(logits, seqs)
    expected = logits.log_softmax(dim=-1)
    for row, token in enumerate(result):
        assert token.token_id == int(logits[row].argmax())
        assert math.isclose(token.logprob, float(expected[row].max()), rel_tol=1e-6)
        assert token.top[0] == (token.token_id, token.logprob) and len(token.top) == 3
        assert [lp for _, lp in token.top] == sorted((lp for _, lp in token.top), reverse=True)


def test_each_row_keeps_its_own_settings():
    logits = torch.zeros(2, VOCAB)
    logits[:, 3] = 1.0
    seqs = [seq(temperature=0.0, logit_bias=((5, 100.0),)), seq(temperature=0.0)]
    assert [t.token_id for t in sample(logits, seqs)] == [5, 3]


def test_repetition_penalty_follows_transformers_semantics():
    logits = logits_row(2.0, -2.0, 2.0, 0, 0, 0, 0, 0)
    out = apply_penalties(logits, [seq(prompt=(0,), outputs=(1,), repetition_penalty=2.0)])
    assert out[0, :3].tolist() == [1.0, -4.0, 2.0]


def test_presence_and_frequency_penalties_count_generated_tokens_only():
    logits = torch.zeros(1, VOCAB)
    out = apply_penalties(logits, [seq(prompt=(4,), outputs=(1, 1, 1, 2), presence_penalty=0.5,
                                       frequency_penalty=0.25)])
    assert out[0, 1].item() == -(0.5 + 3 * 0.25) and out[0, 2].item() == -(0.5 + 0.25)
    assert out[0, 4].item() == 0.0


def test_min_tokens_bans_the_end_until_reached():
    logits = torch.zeros(1, VOCAB)
    logits[0, EOS] = 10.0
    early = seq(temperature=0.0, min_tokens=2, outputs=(1,), stop_token_ids=(6,))
    assert sample(logits, [early])[0].token_id != EOS
    assert apply_penalties(logits, [early])[0, 6].item() == float("-inf")
    late = seq(temperature=0.0, min_tokens=2, outputs=(1, 2))
    assert sample(logits, [late])[0].token_id == EOS


def test_top_k_top_p_min_p_keep_only_their_candidates():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05, 1e-9, 1e-9, 1e-9, 1e-9]]))
    finite = lambda row: set(torch.nonzero(torch.isfinite(row)).flatten().tolist())  # noqa: E731
    assert finite(filter_candidates(logits, [seq(top_k=2)])[0]) == {0, 1}
    assert finite(filter_candidates(logits, [seq(top_p=0.7)])[0]) == {0, 1}
    assert finite(filter_candidates(logits, [seq(top_p=0.5)])[0]) == {0}
    assert finite(filter_candidates(logits, [seq(min_p=0.25)])[0]) == {0, 1, 2}


def test_sampling_follows_the_distribution_and_the_seed():
    probs = torch.tensor([0.6, 0.3, 0.1, 0, 0, 0, 0, 0])
    logits = probs.log().repeat(1, 1)
    counts = torch.zeros(VOCAB)
    rows = [seq(seed=i) for i in range(3000)]
    for start in range(0, len(rows), 500):
        batch = rows[start:start + 500]
        for token in sample(logits.expand(len(batch), -1), batch):
            counts[token.token_id] += 1
    assert torch.allclose(counts / counts.sum(), probs, atol=0.03)
    again = [t.token_id for t in sample(logits.expand(20, -1), [seq(seed=i) for i in range(20)])]
    alone = [sample(logits, [seq(seed=i)])[0].token_id for i in range(20)]
    assert again == alone


def test_ignore_eos_keeps_going_and_stop_token_ids_stop(tokenizer):
    s = seq(ignore_eos=True, tokenizer=tokenizer)
    assert s.append_token(TokenLogprob(EOS, -0.1)).finish_reason is None
    s = seq(stop_token_ids=(5,), tokenizer=tokenizer)
    assert s.append_token(TokenLogprob(5, -0.1)).finish_reason == "stop"
    assert s.cumulative_logprob == -0.1
