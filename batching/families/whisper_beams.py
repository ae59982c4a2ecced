"""Beam search over one Whisper window, as transformers' generate(num_beams=N) runs it with its defaults
(length penalty 1, early_stopping=False): each step keeps the 2N best continuations of the running beams;
those of the best N that end (end of text, or the length limit) become finished hypotheses, scored by their
summed log-probability over their length; the best N that go on are the next running beams. The search ends
when no candidate can go on, or when N hypotheses are finished and the best running beam, scored at its
current length, no longer beats the worst of them.

Each running beam is a row of the batch: the runner feeds every beam its last token, and after each step
copies every beam's self-attention cache from the beam it continues (`advance` returns those parents)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

ENDED = -1.0e9  # what transformers adds to a candidate's score to keep it from running on


@dataclass
class Hypothesis:
    tokens: list[int]  # generated tokens, the end of text included when it ended there
    logprob: float  # summed log-probability of the tokens
    notes: list[Any] = field(default_factory=list)  # one per token, carried along (the alignment scores)

    def extended(self, token: int, logprob: float, note: Any) -> Hypothesis:
        notes = self.notes if note is None else [*self.notes, note]
        return Hypothesis([*self.tokens, token], logprob, notes)


@dataclass
class BeamStep:
    """What one step of a search would make of it, before it is accepted."""
    parents: list[int]  # each new running beam's parent
    running: list[Hypothesis]
    scores: torch.Tensor
    finished: list[tuple[float, Hypothesis]]
    done: bool


class BeamSearch:
    def __init__(self, width: int, end_of_text: int, max_tokens: int) -> None:
        self.width = width
        self.end_of_text = end_of_text
        self.max_tokens = max_tokens
        self.running = [Hypothesis([], 0.0)]  # one beam until the first step: the prompt is the same for all
        self.scores = torch.zeros(1)  # the running beams' summed log-probs, float32 as transformers sums them
        self.finished: list[tuple[float, Hypothesis]] = []  # (length-normalised score, hypothesis), best first
        self.done = False

    @property
    def best(self) -> Hypothesis:
        return self.finished[0][1]

    def propose(self, logprobs: torch.Tensor, notes: list[Any] | None = None) -> BeamStep:
        """One step, the search itself unchanged: `logprobs` [running beams, vocab] (log_softmax of the logits,
        then the decoding rules), `notes` one per running beam (kept with the token it chose)."""
        vocab = logprobs.shape[1]
        notes = notes or [None] * len(self.running)
        total = (logprobs.float().cpu() + self.scores[:, None]).flatten()
        top_scores, top_indices = total.topk(2 * self.width)
        parents, tokens = (top_indices // vocab).tolist(), (top_indices % vocab).tolist()
        length = len(self.running[0].tokens) + 1
        ends = torch.tensor([length >= self.max_tokens or token == self.end_of_text for token in tokens])

        def candidate(index: int) -> Hypothesis:
            parent = parents[index]
            return self.running[parent].extended(tokens[index], float(top_scores[index]), notes[parent])

        normalised = top_scores / length
        finished = [*self.finished, *((float(normalised[index]), candidate(index))  # only the best N may finish
                                      for index in range(self.width) if ends[index])]
        finished = sorted(finished, key=lambda item: item[0], reverse=True)[:self.width]
        running_scores = top_scores + ends.float() * ENDED
        order = running_scores.topk(self.width).indices.tolist()
        scores = running_scores[order]
        can_improve = len(finished) < self.width or float(scores[0] / length) > finished[-1][0]
        return BeamStep([parents[index] for index in order], [candidate(index) for index in order], scores,
                        finished, bool(ends.all()) or not can_improve)

    def accept(self, step: BeamStep) -> None:
        self.running, self.scores, self.finished, self.done = step.running, step.scores, step.finished, step.done
