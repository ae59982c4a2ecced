"""The encoder-decoder decode step on a static cache (Whisper, T5, BART), gpt-fast style: the running sequences
padded to a bucket of fixed size (1, 2, 4, ... up to the batch size), each with one row per beam, one token per
row; self-attention over whole cache rows masked to each row's length (with T5's relative position bias
gathered per row), cross-attention over each sequence's stored encoder K/V (masked to its encoder input's
length where those differ: text; a Whisper window's audio is always as long). Its shapes depend only on the
bucket, so with --torch-compile it is compiled once per bucket at start-up (CUDA graphs on CUDA with mode
reduce-overhead) and never while serving."""

from __future__ import annotations

from pathlib import Path

import torch

from batching.attention import StaticRowStep
from batching.families.encoder_decoder import Seq2SeqFamily, attend_encoded
from batching.families.encoder_decoder_cache import EncoderDecoderRows
from batching.static_decode import BucketedDecoder, bucket_sizes


class StaticStepForward(torch.nn.Module):
    """What is compiled: one decode step over sequences x beams rows, with the caches as buffers, so that a
    compiled graph updates them in place (and CUDA graphs see fixed addresses)."""

    def __init__(self, family: Seq2SeqFamily, cache: EncoderDecoderRows, alignment_layers: list[int]) -> None:
        super().__init__()
        self.family = family
        self.beams = cache.beams
        self.alignment_layers = alignment_layers
        self.layers = len(cache.cross.layers)
        for layer in range(self.layers):
            for name, tensor in zip(("self_keys", "self_values"), cache.self_attention.layers[layer]):
                self.register_buffer(f"{name}_{layer}", tensor, persistent=False)
            for name, tensor in zip(("cross_keys", "cross_values"), cache.cross.layers[layer]):
                self.register_buffer(f"{name}_{layer}", tensor, persistent=False)

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, write_rows: torch.Tensor, lengths: torch.Tensor,
                encoded_lengths: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """ids, positions, write_rows, lengths: [rows]; encoded_lengths: [sequences]. Returns the next-token logits
        [rows, vocab] and, for each alignment layer, its cross-attention queries [rows, heads, dim] (Whisper's word
        timing scores them against the audio keys)."""
        self_keys = self._cache("self_keys")
        bias = self.family.row_position_bias(positions, self_keys[0].shape[2]) \
            if self.family.row_position_bias else None
        step = StaticRowStep(self_keys, self._cache("self_values"), write_rows, positions, lengths, bias)
        sequences = ids.shape[0] // self.beams
        encoded = torch.arange(self.cross_keys_0.shape[2], device=ids.device) < encoded_lengths[:, None] \
            if self.family.encoded_lengths_vary else None
        alignment_queries = []

        def cross_attend(layer: int, query: torch.Tensor) -> torch.Tensor:
            if layer in self.alignment_layers:
                alignment_queries.append(query[:, :, 0])
            keys, values = getattr(self, f"cross_keys_{layer}"), getattr(self, f"cross_values_{layer}")
            return attend_encoded(query, keys[:sequences], values[:sequences], self.beams, encoded)

        hidden = self.family.decode(ids[:, None], positions[:, None], step, cross_attend)
        return self.family.logits(hidden[:, -1]).float(), alignment_queries

    def _cache(self, name: str) -> list[torch.Tensor]:
        return [getattr(self, f"{name}_{layer}") for layer in range(self.layers)]


class StaticRowDecoder(BucketedDecoder):
    def __init__(self, family: Seq2SeqFamily, cache: EncoderDecoderRows, device: torch.device,
                 alignment_layers: list[int] | None = None, compile_mode: str | None = None, smallest: int = 1,
                 names: tuple[str, str] = ("encoder-decoder decode step", "sequence"), saved_in: Path | None = None
                 ) -> None:
        """smallest: the smallest bucket (a batch-invariant engine's minimum rows); names: the step's and a
        sequence's, for the log; saved_in: as BucketedDecoder's."""
        self.cache = cache
        self.alignment_layers = alignment_layers or []
        buckets = bucket_sizes(cache.max_rows, min(smallest, cache.max_rows))
        super().__init__(StaticStepForward(family, cache, self.alignment_layers), buckets, device, compile_mode,
                         names, saved_in)

    @torch.inference_mode()
    def decode(self, rows: list[int], ids: list[int], lengths: list[int]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """One token for each given self-attention row (its last token, the row's length with it): the rows'
        logits [len(rows), vocab], and each alignment layer's queries of those rows. The other rows of the
        bucket are padding: they write to the scratch row and their results are dropped."""
        inputs = self._padding(self.bucket(max(rows) // self.cache.beams + 1))
        all_ids, positions, write_rows, all_lengths, _ = inputs
        for row, token, length in zip(rows, ids, lengths):
            all_ids[row], positions[row], write_rows[row], all_lengths[row] = token, length - 1, row, length
        logits, queries = self._run(inputs)
        kept = self._tensor(rows)
        return logits[kept], [layer_queries[kept] for layer_queries in queries]

    def _padding(self, sequences: int) -> list[list[int]]:
        """ids, positions, write rows, lengths (every row of the sequences' beams: to the scratch row, attending to
        one position) and each sequence's encoded length (a padding sequence attends to one encoder position, so
        that no row's attention is empty)."""
        rows = sequences * self.cache.beams
        encoded_lengths = [max(length, 1) for length in self.cache.cross_lengths[:sequences]]
        return [[0] * rows, [0] * rows, [self.cache.scratch_row] * rows, [1] * rows, encoded_lengths]
