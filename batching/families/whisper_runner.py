"""Whisper on the encoder-decoder runner (batching.families.encoder_decoder): each window's audio is encoded
once, its decoder rows decode over it; on top, Whisper's decoding rules (batching.families.whisper_rules),
beam search (batching.families.whisper_beams, one row per beam, every beam attending to the window's one copy
of its audio K/V), the no-speech probability read at <|startoftranscript|>, and, for a window that wants word
timestamps, the alignment heads' cross-attention scores of the query that chose each token (speech.word_timing
turns them into times when the window ends). A static cache decodes through batching.families.encoder_decoder_static.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch
from transformers import WhisperForConditionalGeneration

from batching.families.encoder_decoder import EncoderDecoderRunner
from batching.families.encoder_decoder_cache import EncoderDecoderRows
from batching.families.encoder_decoder_static import StaticRowDecoder
from batching.families.whisper_beams import BeamSearch, BeamStep, Hypothesis
from batching.families.whisper_decoder import WhisperFamily
from batching.families.whisper_rules import WhisperLogitRules
from batching.sampler import sample
from batching.scheduler import Span
from batching.sequence import Sequence, TokenLogprob


@dataclass(frozen=True, eq=False)
class SpeechWindow:
    """What the runner needs beyond token ids for one window."""
    features: torch.Tensor  # [mel bins, frames]: the window's log-mel spectrogram
    start_index: int  # where <|startoftranscript|> sits in the prompt (no_speech_prob is read there)
    detect_language: bool = False
    beams: int = 1  # beam search width; 1 samples (greedy at temperature 0)
    audio_positions: int | None = None  # encoder positions that hold audio (20 ms each); word timing only


@dataclass(frozen=True)
class WindowResult:
    """What a window's deltas report beyond its tokens."""
    no_speech_prob: float  # of <|nospeech|> at <|startoftranscript|>, known from the window's first token on
    # on its last delta: its best hypothesis under beam search, else its sampled tokens; the notes are each token's
    # alignment scores ([heads, audio_positions], float32, on the model's device), for a window with audio_positions
    decoded: Hypothesis | None = None

    @property
    def alignment_scores(self) -> list[torch.Tensor]:
        return self.decoded.notes


@dataclass
class WindowDecoding:
    """The runner's account of one window as it decodes: its sequence keeps it (window_decoding) and reports it
    in its deltas."""
    no_speech_prob: float = 0.0
    search: BeamSearch | None = None  # the window's beam search, from its first step on
    # per sampled token: the alignment heads' cross-attention scores of the query that chose it
    alignment_scores: list[torch.Tensor] = field(default_factory=list)

    @property
    def rows(self) -> int:
        """Rows it decodes in a step: one per running beam."""
        return len(self.search.running) if self.search else 1

    def result(self, seq: Sequence) -> WindowResult:
        """What a delta of the window reports. (The sequence of a beam-searched window carries the best running
        beam's newest token at each step, so that it advances and ends with the search; its own tokens are not
        the transcript's.)"""
        if not seq.finished:
            return WindowResult(self.no_speech_prob)
        decoded = self.search.best if self.search else Hypothesis(
            list(seq.output_ids), seq.cumulative_logprob, self.alignment_scores)
        return WindowResult(self.no_speech_prob, decoded)


def alignment_heads(model: WhisperForConditionalGeneration) -> dict[int, list[int]]:
    """The cross-attention heads that follow the audio (from the generation config), by decoder layer."""
    heads: defaultdict[int, list[int]] = defaultdict(list)
    for layer, head in getattr(model.generation_config, "alignment_heads", None) or []:
        heads[layer].append(head)
    return dict(heads)


def beam_rows(seqs: list[Sequence]) -> list[tuple[Sequence, int]]:
    """The rows a step computes, in order: (window, beam) for each running beam, (window, 0) for the others."""
    return [(seq, beam) for seq in seqs for beam in range(seq.window_decoding.rows)]


def history(seq: Sequence, beam: int) -> list[int]:
    """The tokens a row has generated: its beam's, or the sequence's own."""
    search = seq.window_decoding.search
    return search.running[beam].tokens if search else seq.output_ids


class AlignmentRecorder:
    """Collects, during one forward, the alignment heads' cross-attention scores of the rows whose windows want
    them (row i belongs to windows[i])."""

    def __init__(self, heads: dict[int, list[int]], windows: list[SpeechWindow]) -> None:
        self.heads = heads
        self.wanting = {index: window for index, window in enumerate(windows) if window.audio_positions}
        self.scores: defaultdict[int, list[torch.Tensor]] = defaultdict(list)

    def record(self, layer: int, index: int, query: torch.Tensor, keys: torch.Tensor) -> None:
        """query: [heads, dim] (scaled), keys: [heads, frames, dim] of row `index`'s window."""
        if index in self.wanting and layer in self.heads:
            heads = self.heads[layer]
            self.scores[index].append(torch.einsum("hd,hfd->hf", query[heads], keys[heads]))

    def finish(self) -> dict[int, torch.Tensor]:
        """Each wanting row's scores, [alignment heads, audio positions]."""
        return {index: torch.cat(self.scores[index])[:, :window.audio_positions].float()
                for index, window in self.wanting.items()}


class WhisperRunner(EncoderDecoderRunner):
    def __init__(self, model: WhisperForConditionalGeneration, cache: EncoderDecoderRows,
                 rules: WhisperLogitRules, static: StaticRowDecoder | None = None, min_rows: int = 1) -> None:
        super().__init__(WhisperFamily(model), cache, model.device, min_rows, static)
        self.rules = rules
        self.alignment_heads = alignment_heads(model)

    @torch.inference_mode()
    def step(self, spans: list[Span]) -> list[list[TokenLogprob]]:
        """One token per span (as a list: the engine's runners may emit several), in span order: new windows'
        prompts are prefilled whole, running ones decode (rows 0..B-1, in row order). No window changes until every
        window's token is chosen, so a step that fails can be run again (on fewer rows) as it was."""
        prefilling = [span.seq for span in spans if span.start == 0]
        decoding = [span.seq for span in spans if span.start > 0]
        if any(seq.output_ids for seq in prefilling):
            raise RuntimeError("a Whisper window preempted after it began decoding cannot resume")
        logits, alignment = self._forward(prefilling, decoding)
        rows = beam_rows(prefilling + decoding)
        with self.timed("rules_and_sampling"):
            searching = [index for index, (seq, _) in enumerate(rows) if seq.inputs.beams > 1]
            if searching:  # beams add up log-probabilities: normalised first, then ruled (as transformers does)
                logits[searching] = logits[searching].log_softmax(dim=-1)
            ruled = self.rules.apply(logits, [history(seq, beam) for seq, beam in rows],
                                     [seq.inputs.detect_language for seq, _ in rows])
            sampling = [index for index, (seq, _) in enumerate(rows) if seq.inputs.beams == 1]
            sampled = sample(ruled[sampling], [rows[index][0] for index in sampling]) if sampling else []
            proposals = {seq: self._propose(seq, ruled[indices], [alignment.get(index) for index in indices])
                         for seq, indices in self._rows_by_window(rows, searching).items()}
        chosen = {seq: self._accept(seq, *proposal) for seq, proposal in proposals.items()}
        for index, token in zip(sampling, sampled):
            seq = rows[index][0]
            chosen[seq] = token
            if index in alignment:
                seq.window_decoding.alignment_scores.append(alignment[index])
        return [[chosen[span.seq]] for span in spans]

    @torch.inference_mode()
    def logits(self, prefilling: list[Sequence], decoding: list[Sequence]) -> torch.Tensor:
        """The model's next-token logits ([rows, vocab] float32), before Whisper's rules: one row per prefilling
        window, then one per decoding row."""
        return self._forward(prefilling, decoding)[0]

    def last_token(self, seq: Sequence, beam: int) -> int:
        return history(seq, beam)[-1]

    def _forward(self, prefilling: list[Sequence], decoding: list[Sequence]
                 ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """The logits, and the alignment scores of the rows that want them (by row)."""
        logits, alignment = [], {}
        if prefilling:
            prefill_logits, alignment = self._prefill_logits(prefilling)
            logits.append(prefill_logits)
        if decoding:
            decode_logits, decode_alignment = self._decode_logits(decoding)
            alignment |= {len(prefilling) + index: scores for index, scores in decode_alignment.items()}
            logits.append(decode_logits)
        return torch.cat(logits), alignment

    @staticmethod
    def _rows_by_window(rows: list[tuple[Sequence, int]], indices: list[int]) -> dict[Sequence, list[int]]:
        by_window: dict[Sequence, list[int]] = {}
        for index in indices:
            by_window.setdefault(rows[index][0], []).append(index)
        return by_window

    def _propose(self, seq: Sequence, logprobs: torch.Tensor, alignment: list[torch.Tensor | None]
                 ) -> tuple[BeamSearch, BeamStep]:
        window = seq.inputs
        search = (seq.window_decoding.search
                  or BeamSearch(window.beams, self.rules.tokens.end_of_text, seq.params.max_tokens))
        return search, search.propose(logprobs, alignment if window.audio_positions else None)

    def _accept(self, seq: Sequence, search: BeamSearch, step: BeamStep) -> TokenLogprob:
        """A window's beam search takes its step: its beams' caches follow their parents; the sequence gets the
        best running beam's token, or the end of text once the search is done."""
        search.accept(step)
        seq.window_decoding.search = search
        if search.done:
            return TokenLogprob(self.rules.tokens.end_of_text, 0.0)
        self.cache.reorder_beams(seq.row, step.parents, seq.length)
        return TokenLogprob(search.running[0].tokens[-1], 0.0)

    def _prefill_logits(self, seqs: list[Sequence]) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        for seq in seqs:  # a window's decoding begins (again, if a failed step is run again)
            seq.window_decoding = WindowDecoding()
        recorder = AlignmentRecorder(self.alignment_heads, [seq.inputs for seq in seqs])
        hidden, spans = self.prefill(seqs, recorder)
        starts = [start + seq.inputs.start_index for (start, _), seq in zip(spans, seqs)]
        ends = [end - 1 for _, end in spans]
        logits = self.head(hidden[0], starts + ends).float()
        self._record_no_speech(seqs, logits[:len(seqs)])
        return logits[len(seqs):], recorder.finish()

    def _decode_logits(self, seqs: list[Sequence]) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """One row per running beam of each window (one for a window that samples), windows in row order."""
        rows = beam_rows(seqs)
        if self.static is not None:
            return self._static_decode_logits(rows)
        recorder = AlignmentRecorder(self.alignment_heads, [seq.inputs for seq, _ in rows])
        return self.head(self.decode(rows, recorder), list(range(len(rows)))).float(), recorder.finish()

    def _static_decode_logits(self, rows: list[tuple[Sequence, int]]) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        logits, queries = self.static_decode(rows)
        recorder = AlignmentRecorder(self.alignment_heads, [seq.inputs for seq, _ in rows])
        for layer, layer_queries in zip(self.static.alignment_layers, queries):
            for index in recorder.wanting:
                keys, _ = self.cache.cross_rows(layer, rows[index][0].row, rows[index][0].row + 1)
                recorder.record(layer, index, layer_queries[index], keys[0])
        return logits, recorder.finish()

    def _record_no_speech(self, seqs: list[Sequence], start_logits: torch.Tensor) -> None:
        no_speech = self.rules.tokens.no_speech
        if no_speech is None:
            return
        for seq, probability in zip(seqs, start_logits.softmax(dim=-1)[:, no_speech].tolist()):
            seq.window_decoding.no_speech_prob = probability
