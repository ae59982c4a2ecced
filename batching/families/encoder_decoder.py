"""Model forwards for one encoder-decoder engine step (Whisper, T5, BART), driving the HF modules' own weights
layer by layer through a family's arithmetic (batching.families.t5, .bart, .whisper_decoder).

Newly admitted sequences: the encoder runs once over all of them, every decoder layer's cross-attention K/V
are projected from its output once and stored in the sequence's row (a sibling of the same prompt copies
them), then the decoder prompts run packed. Running sequences: one token per row, self-attention over the
row's own cache (attended row by row, so a row's result does not depend on its neighbours), cross-attention
over the row's stored K/V. A sequence decoded with beam search (Whisper's) decodes one row per beam, every beam
attending to the sequence's one copy of the cross-attention K/V."""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Iterator, Protocol

import torch
import torch.nn.functional as F
from torch.nn import Linear

from batching.attention import (DecodeStep, PositionBias, PrefillStep, Step, attend_cache_rows, attend_decoding,
                                batchwise_attention, pack_prompts)
from batching.families.encoder_decoder_cache import EncoderDecoderRows
from batching.sampler import sample
from batching.scheduler import Span
from batching.sequence import Sequence, TokenLogprob
from kernels.decode_attention import runs_here

CrossAttend = Callable[[int, torch.Tensor], torch.Tensor]  # (layer, query [N, heads, L, dim]) -> output


class Seq2SeqFamily(Protocol):
    """One architecture's arithmetic over its HF modules."""
    layers: int  # decoder layers
    heads: int
    head_dim: int
    position_bias: PositionBias | None  # the decoder self-attention's, if the family has one
    # the same over whole static cache rows: (each row's position [rows], row length) -> [rows, heads, 1, length]
    row_position_bias: Callable[[torch.Tensor, int], torch.Tensor] | None
    encoded_lengths_vary: bool  # whether encoder inputs differ in length (text) or are all as long (audio)

    def encode(self, inputs: list[Any]) -> tuple[torch.Tensor, list[int]]:
        """The encoder's output for a batch of sequences' inputs, [N, positions, hidden], and how many positions
        of each are real (the rest is padding)."""

    def cross_keys_values(self, layer: int, encoded: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A decoder layer's cross-attention K/V of encoder output [N, positions, hidden]: [N, heads, positions,
        dim]."""

    def decode(self, ids: torch.Tensor, positions: torch.Tensor, step: Step, cross_attend: CrossAttend
               ) -> torch.Tensor:
        """ids/positions [N, L] through the decoder: self-attention through batching.attention with `step`,
        cross-attention through `cross_attend` (given queries scaled as the family scales them); hidden states."""

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LM head over decoder hidden states."""


@dataclass
class TextInput:
    """A text sequence's encoder input."""
    ids: list[int]


class StaticStep(Protocol):
    """A static-shape decode step over the cache's rows (batching.families.encoder_decoder_static)."""

    def decode(self, rows: list[int], ids: list[int], lengths: list[int]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Logits [len(rows), vocab] for one token per self-attention row, and alignment layers' queries."""

    def warm_up(self, on_ready: Callable[[int, int], None]) -> None:
        """Compile every bucket before serving."""


class Tap(Protocol):
    """Watches cross-attention queries of some rows of a forward (Whisper's word timing)."""
    wanting: dict[int, Any]  # the rows (indices into the forward's rows) it watches

    def record(self, layer: int, index: int, query: torch.Tensor, keys: torch.Tensor) -> None:
        """query: [heads, dim] of row `index`'s last token, keys: [heads, positions, dim] of its encoder input."""


def encode_text(encoder: torch.nn.Module, inputs: list[TextInput], pad_token_id: int | None
                ) -> tuple[torch.Tensor, list[int]]:
    """An HF text encoder over a batch of token id sequences, padded to the longest (padding masked out)."""
    lengths = [len(item.ids) for item in inputs]
    longest = max(lengths)
    ids = [item.ids + [pad_token_id or 0] * (longest - len(item.ids)) for item in inputs]
    mask = [[1] * length + [0] * (longest - length) for length in lengths]
    device = encoder.device
    encoded = encoder(input_ids=torch.tensor(ids, device=device), attention_mask=torch.tensor(mask, device=device))
    return encoded.last_hidden_state, lengths


def split_heads(states: torch.Tensor, heads: int) -> torch.Tensor:
    """[N, L, heads * dim] -> [N, heads, L, dim]"""
    return states.view(*states.shape[:2], heads, -1).transpose(1, 2)


def self_attention(module: torch.nn.Module, projections: tuple[Linear, Linear, Linear, Linear], hidden: torch.Tensor,
                   step: Step, heads: int, scaling: float = 1.0) -> torch.Tensor:
    """A decoder layer's self-attention through batching.attention: projections are (query, key, value, output);
    queries scaled by `scaling` before attending, as HF's Whisper and BART do."""
    query, key, value, output = projections
    attended, _ = batchwise_attention(module, split_heads(query(hidden) * scaling, heads),
                                      split_heads(key(hidden), heads), split_heads(value(hidden), heads), None,
                                      scaling=1.0, batchwise_step=step)
    return output(attended.reshape(*hidden.shape[:-1], -1))


def cross_attention(query: Linear, output: Linear, hidden: torch.Tensor, attend: Callable[[torch.Tensor], torch.Tensor],
                    heads: int, scaling: float = 1.0) -> torch.Tensor:
    attended = attend(split_heads(query(hidden) * scaling, heads))
    return output(attended.transpose(1, 2).reshape(*hidden.shape[:-1], -1))


def attend_encoded(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, queries: int,
                   attended: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-attention of one token per row ([sequences x queries, heads, 1, dim], queries already scaled) over
    each sequence's encoder K/V ([sequences, heads, positions, dim]; all of them attended, or those `attended`
    marks, [sequences, positions]): a sequence's rows (its beams) are laid along the query axis of one
    attention."""
    sequences, heads = keys.shape[0], keys.shape[1]
    if attended is None and runs_here(query):
        rows = torch.arange(sequences, device=query.device).repeat_interleave(queries)
        lengths = torch.full_like(rows, keys.shape[2])
        return attend_cache_rows(query, keys, values, rows, lengths, 1.0).transpose(1, 2)
    grouped = query.reshape(sequences, queries, heads, -1).transpose(1, 2)  # [sequences, heads, queries, dim]
    if attended is None:  # the eager step's calls, often one sequence each: SDPA measured faster there
        output = F.scaled_dot_product_attention(grouped, keys, values, scale=1.0)
    else:  # the static step's whole bucket at once
        output = attend_decoding(grouped, keys, values, attended[:, None, None, :], 1.0)
    return output.transpose(1, 2).reshape(sequences * queries, 1, heads, -1).transpose(1, 2)


class EncoderDecoderRunner:
    """The engine's runner for an encoder-decoder model: sequences' `inputs` are what the family encodes; each
    step samples one token per span."""

    def __init__(self, family: Seq2SeqFamily, cache: EncoderDecoderRows, device: torch.device, min_rows: int = 1,
                 static: StaticStep | None = None) -> None:
        """min_rows > 1: batch-invariant, every forward has at least that many rows (padding rows write to the
        cache's scratch row; see batching.runner.MIN_INVARIANT_ROWS) and every encoder input is encoded alone.
        static: running rows decode through this static-shape step (a static cache)."""
        self.family = family
        self.cache = cache
        self.device = device
        self.min_rows = min_rows
        self.static = static
        self.seconds: defaultdict[str, float] = defaultdict(float)  # cumulative time per phase, for benchmarks

    @torch.inference_mode()
    def step(self, spans: list[Span]) -> list[list[TokenLogprob]]:
        """One token per span (as a list: the engine's runners may emit several), in span order: new sequences
        are prefilled whole, running ones decode."""
        prefilling = [span.seq for span in spans if span.start == 0]
        decoding = [span.seq for span in spans if span.start > 0]
        logits = []
        if prefilling:
            hidden, spans_of = self.prefill(prefilling)
            logits.append(self.head(hidden[0], [end - 1 for _, end in spans_of]))
        if decoding:
            rows = [(seq, 0) for seq in decoding]
            logits.append(self.static_decode(rows)[0] if self.static else
                          self.head(self.decode(rows), list(range(len(decoding)))))
        chosen = dict(zip(prefilling + decoding, sample(torch.cat(logits).float(), prefilling + decoding)))
        return [[chosen[span.seq]] for span in spans]

    def warm_up(self, on_ready: Callable[[int, int], None]) -> None:
        """On the torch thread, before serving: compile (and record CUDA graphs for) the static decode step;
        on_ready(batch sizes ready, all of them) after each."""
        if self.static is not None:
            self.static.warm_up(on_ready)

    def head(self, hidden: torch.Tensor, rows: list[int]) -> torch.Tensor:
        """The LM head over the given rows of hidden [N, hidden], run over at least min_rows rows (the last one
        repeated, and dropped after)."""
        kept = rows + rows[-1:] * (self.min_rows - len(rows))
        return self.family.logits(hidden[self.tensor(kept)])[:len(rows)]

    def prefill(self, seqs: list[Sequence], tap: Tap | None = None) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """Encode the sequences' inputs into their rows, then run their decoder tokens packed: the decoder's hidden
        states [1, tokens, hidden] and each sequence's span of them."""
        rows = [seq.row for seq in seqs]
        with self.timed("encoder"):
            self._store_cross_attention(seqs)
        with self.timed("decoder_prefill"):
            self.cache.grow_rows(max(seq.length for seq in seqs))
            ids, positions, token_rows, spans = pack_prompts(seqs)
            cache_rows = [self.cache.beam_row(row) for row in token_rows]
            missing = max(self.min_rows - len(ids), 0)  # padding tokens: a span of their own in the scratch row
            padding = [(len(ids), len(ids) + missing)] if missing else []
            ids.extend([0] * missing)
            positions.extend(range(missing))
            cache_rows.extend([self.cache.scratch_row] * missing)
            position_tensor = self.tensor(positions)
            step = PrefillStep(self.cache.self_attention, self.tensor(cache_rows), position_tensor, spans + padding,
                               self.family.position_bias)
            attend = partial(self._cross_prefill, spans=spans, rows=rows, tap=tap, padding=missing)
            return self.family.decode(self.tensor(ids)[None], position_tensor[None], step, attend), spans

    def decode(self, rows: list[tuple[Sequence, int]], tap: Tap | None = None) -> torch.Tensor:
        """One token for each (sequence, beam) row, sequences in row order with all their beams: the decoder's
        hidden states [rows, hidden], then those of the padding rows of a batch-invariant step."""
        with self.timed("decoder_steps"):
            missing = max(self.min_rows - len(rows), 0)
            lengths = [seq.length for seq, _ in rows] + [1] * missing
            self.cache.grow_rows(max(lengths))
            positions = self.tensor([length - 1 for length in lengths])
            cache_rows = [self.cache.beam_row(seq.row, beam) for seq, beam in rows] + [self.cache.scratch_row] * missing
            step = DecodeStep(self.cache.self_attention, cache_rows, positions, lengths, self.family.position_bias)
            ids = self.tensor([self.last_token(seq, beam) for seq, beam in rows] + [0] * missing)[:, None]
            queries = [count for _, count in self._runs(rows)]
            attend = partial(self._cross_decode, queries=queries, tap=tap, padding=missing)
            return self.family.decode(ids, positions[:, None], step, attend)[:, -1]

    def static_decode(self, rows: list[tuple[Sequence, int]]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """decode's rows through the static step: their logits [rows, vocab] (float32), and the cross-attention
        queries [rows, heads, dim] of the static step's alignment layers."""
        with self.timed("decoder_steps"):
            return self.static.decode([self.cache.beam_row(seq.row, beam) for seq, beam in rows],
                                      [self.last_token(seq, beam) for seq, beam in rows],
                                      [seq.length for seq, _ in rows])

    def last_token(self, seq: Sequence, beam: int) -> int:
        """The newest token of a row (a beam search's runner overrides it)."""
        return seq.last_token

    def _store_cross_attention(self, seqs: list[Sequence]) -> None:
        shared = [seq for seq in seqs if seq.prefix_source is not None and seq.prefix_source.row >= 0]
        encoding = [seq for seq in seqs if seq not in shared]
        batches = [[seq] for seq in encoding] if self.min_rows > 1 else [encoding]
        for batch in filter(None, batches):
            rows = [seq.row for seq in batch]
            encoded, lengths = self.family.encode([seq.inputs for seq in batch])
            for layer in range(self.family.layers):
                keys, values = self.family.cross_keys_values(layer, encoded)
                self.cache.store_cross(layer, rows, keys, values, lengths)
        for seq in shared:
            self.cache.share_cross(seq.prefix_source.row, seq.row)

    def _cross_prefill(self, layer: int, query: torch.Tensor, spans: list[tuple[int, int]], rows: list[int],
                       tap: Tap | None, padding: int = 0) -> torch.Tensor:
        """Packed prompts ([1, heads, tokens, dim]): each span attends to its own row's encoder K/V; the span's
        last query chooses the first token. The last `padding` tokens attend to nothing."""
        outputs = []
        for index, ((start, end), row) in enumerate(zip(spans, rows)):
            keys, values = self.cache.cross_rows(layer, row, row + 1)
            outputs.append(F.scaled_dot_product_attention(query[:, :, start:end], keys, values, scale=1.0))
            if tap is not None and index in tap.wanting:
                tap.record(layer, index, query[0, :, end - 1], keys[0])
        if padding:
            outputs.append(torch.zeros_like(query[:, :, -padding:]))
        return torch.cat(outputs, dim=2)

    def _cross_decode(self, layer: int, query: torch.Tensor, queries: list[int], tap: Tap | None, padding: int = 0
                      ) -> torch.Tensor:
        """One token per row ([rows, heads, 1, dim]); sequence s (row s of the cross-attention K/V) has queries[s]
        of them, one per beam; the last `padding` rows attend to nothing. Sequences whose encoder inputs are as
        long, with as many queries each, attend as one batch; otherwise each attends alone to its own length."""
        if padding:
            attended = self._cross_decode(layer, query[:len(query) - padding], queries, tap)
            return torch.cat([attended, torch.zeros_like(query[-padding:])])
        keys, values = self.cache.cross_rows(layer, 0, len(queries))
        lengths = self.cache.cross_lengths[:len(queries)]
        if tap is not None:
            row_of = [sequence for sequence, count in enumerate(queries) for _ in range(count)]
            for index in tap.wanting:
                tap.record(layer, index, query[index, :, 0], keys[row_of[index], :, :lengths[row_of[index]]])
        if len(set(queries)) == 1 and len(set(lengths)) == 1:
            return attend_encoded(query, keys, values, queries[0])
        starts = [sum(queries[:sequence]) for sequence in range(len(queries) + 1)]
        return torch.cat([
            attend_encoded(query[start:end], keys[s:s + 1, :, :lengths[s]], values[s:s + 1, :, :lengths[s]], count)
            for s, (count, start, end) in enumerate(zip(queries, starts, starts[1:]))])

    @staticmethod
    def _runs(rows: list[tuple[Sequence, int]]) -> list[tuple[Sequence, int]]:
        """Each sequence of the rows (in order) and how many rows it has."""
        counts: dict[Sequence, int] = {}
        for seq, _ in rows:
            counts[seq] = counts.get(seq, 0) + 1
        return list(counts.items())

    def tensor(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)

    @contextmanager
    def timed(self, phase: str) -> Iterator[None]:
        started = time.perf_counter()
        yield
        if self.device.type == "cuda":  # kernels run asynchronously: wait so the time lands in its phase
            torch.cuda.synchronize(self.device)
        self.seconds[phase] += time.perf_counter() - started
