"""The attention function every HF model in the engine runs through, registered with transformers'
AttentionInterface: the model is loaded with ``attn_implementation="batchwise"`` and called without a
transformers Cache; each attention layer hands its new keys/values to ``batchwise_attention``, which passes
them to the forward's step: the step writes them into the engine's KV memory and attends over them, as its
type says (its ``attend``):

- SpanStep (the chat engine): the step's tokens are packed into one [1, tokens] forward, each sequence's
  span attends to its own extent of the KV arena (its cached prefix, then its span, causally);
- StaticDecodeStep (the chat engine with a static cache): one token per row of a [rows, 1] batch, every
  row attending over its whole fixed-length slot, masked to its own length: shapes never change, so the
  step compiles once per batch size (on CPU a row attends to exactly its own keys, wherever they start, so
  a prompt chunk can also lie one token per row, each row attending up to its own position);
- PrefillStep / DecodeStep (row caches, as the Whisper runner uses): packed prompts, then one token per row;
  StaticRowStep: the same rows allocated whole, every row attending over all of its row masked to its length;
- ProbeStep: one token through the model to learn its KV layout.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Callable, NamedTuple, Protocol

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

from batching.kv_arena import KVArena, KVLayout
from batching.kv_cache import RowKVCache
from batching.sequence import Sequence
from kernels.decode_attention import attend_rows, row_cache_as_tokens, runs_here

ATTENTION_NAME = "batchwise"


class Step(Protocol):
    """What one forward's attention layers attend through."""

    def attend(self, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               scaling: float | None) -> torch.Tensor:
        """Store the layer's new K/V ([batch, kv_heads, tokens, dim]) and attend over the memory with query
        [batch, heads, tokens, dim] (scaling: None for 1/sqrt(dim)); returns [batch, tokens, heads, dim]."""


class PackedSpan(NamedTuple):
    """One sequence's span of a packed forward: its queries at packed positions start..end attend to the
    kv_length K/V from arena position kv_start on (its cached prefix, then the span's own)."""
    start: int
    end: int
    kv_start: int
    kv_length: int


@dataclass
class SpanStep:
    arena: KVArena
    slots: torch.Tensor  # [tokens]: where each packed token's K/V go in the arena
    spans: list[PackedSpan]

    @cached_property
    def decoding(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The one-token spans (decoding rows), for attend_rows: packed query index, K/V base, K/V length."""
        rows = [(span.start, span.kv_start, span.kv_length) for span in self.spans if span.end - span.start == 1]
        columns = list(zip(*rows)) or [(), (), ()]
        return tuple(torch.tensor(column, dtype=torch.long, device=self.slots.device) for column in columns)

    def attend(self, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               scaling: float | None) -> torch.Tensor:
        """Packed spans ([1, heads, tokens, dim]); each attends to its sequence's extent up to its own position.
        On CPU the one-token spans (decoding rows) go to attend_rows together; elsewhere a one-token span lays the
        query heads that share a KV head along the query axis, so K/V are read as they lie, never repeated."""
        self.arena.write(module.layer_idx, self.slots, key[0], value[0])
        cached_keys, cached_values = self.arena.layer(module.layer_idx)
        if not runs_here(query) or len(self.decoding[0]) == 0:
            return _spans_one_by_one(query, cached_keys, cached_values, scaling, self.spans)
        indices, bases, lengths = self.decoding
        scale = query.shape[-1] ** -0.5 if scaling is None else scaling
        decoded = attend_rows(query[0, :, indices].transpose(0, 1), cached_keys, cached_values, bases, lengths, scale)
        if len(indices) == query.shape[2]:
            return decoded[None]
        output = query.new_empty(query.shape[2], query.shape[1], query.shape[3])
        output[indices] = decoded
        for span in self.spans:
            if span.end - span.start > 1:
                output[span.start:span.end] = _spans_one_by_one(query, cached_keys, cached_values, scaling, [span])[0]
        return output[None]


def _spans_one_by_one(query: torch.Tensor, cached_keys: torch.Tensor, cached_values: torch.Tensor,
                      scaling: float | None, spans: list[PackedSpan]) -> torch.Tensor:
    """The spans' attention as [1, tokens of the spans, heads, dim], one SDPA call per span."""
    heads, head_dim = query.shape[1], query.shape[3]
    kv_heads = cached_keys.shape[0]
    outputs = []
    for start, end, base, length in spans:
        keys, values = cached_keys[None, :, base:base + length], cached_values[None, :, base:base + length]
        tokens = end - start
        if tokens == 1:
            grouped_query = query[:, :, start].reshape(1, kv_heads, heads // kv_heads, head_dim)
            output = F.scaled_dot_product_attention(grouped_query, keys, values, scale=scaling)
            outputs.append(output.reshape(1, heads, 1, head_dim))
        elif tokens == length:
            outputs.append(F.scaled_dot_product_attention(query[:, :, start:end], keys, values, is_causal=True,
                                                          scale=scaling, enable_gqa=True))
        else:
            outputs.append(F.scaled_dot_product_attention(query[:, :, start:end], keys, values,
                                                          attn_mask=causal_lower_right(tokens, length),
                                                          scale=scaling, enable_gqa=True))
    return torch.cat(outputs, dim=2).transpose(1, 2)


@dataclass
class StaticDecodeStep:
    keys: list[torch.Tensor]  # the arena's, per layer: [kv_heads, tokens, head_dim]; one layer's alone in a step
    values: list[torch.Tensor]  # built for that layer (batching.layer_regions)
    slot_length: int
    lengths: torch.Tensor  # [rows]: each row's keys after this token
    positions: torch.Tensor  # [rows]: arena position of each row's new token
    starts: torch.Tensor  # [rows]: arena position of each row's first key (row r's slot, r x slot_length, where
    # attend_rows does not serve: there every row attends over its own slot)

    def attend(self, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               scaling: float | None) -> torch.Tensor:
        """One token per row ([rows, heads, 1, dim]), every row's K/V written before any row attends. With
        attend_rows a row attends to its `lengths` keys from its `starts`; otherwise row r's slot is arena
        positions r x L .. (r + 1) x L, and every row attends over all L of them with the positions past its
        length masked out."""
        rows, kv_heads, head_dim, length = query.shape[0], key.shape[1], key.shape[3], self.slot_length
        layer = 0 if len(self.keys) == 1 else module.layer_idx
        cached_keys, cached_values = self.keys[layer], self.values[layer]
        positions, lengths = self.positions.to(query.device), self.lengths.to(query.device)  # same device: no copy
        cached_keys[:, positions] = key[:, :, 0].transpose(0, 1)
        cached_values[:, positions] = value[:, :, 0].transpose(0, 1)
        if runs_here(query):
            scale = head_dim ** -0.5 if scaling is None else scaling
            return attend_rows(query[:, :, 0], cached_keys, cached_values, self.starts.to(query.device), lengths,
                               scale)[:, None]
        keys = cached_keys[:, :rows * length].view(kv_heads, rows, length, head_dim).transpose(0, 1)
        values = cached_values[:, :rows * length].view(kv_heads, rows, length, head_dim).transpose(0, 1)
        mask = torch.arange(length, device=query.device) < lengths[:, None]
        return _attend_grouped(query, keys, values, mask[:, None, None, :], scaling)


@dataclass
class ProbeStep:
    """Records, per layer index, the shape of the K/V one token gives and the device they are computed on."""
    shapes: dict[int, tuple[int, int, torch.dtype]] = field(default_factory=dict)
    devices: dict[int, torch.device] = field(default_factory=dict)

    def attend(self, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               scaling: float | None) -> torch.Tensor:
        self.shapes[module.layer_idx] = (key.shape[1], key.shape[3], key.dtype)
        self.devices[module.layer_idx] = key.device
        return query.transpose(1, 2)


# An additive attention bias by relative position (T5's): bias(queries, keys) is [1, heads, queries, keys] for the
# last `queries` of `keys` positions, causal mask included.
PositionBias = Callable[[int, int], torch.Tensor]


@dataclass
class PrefillStep:
    cache: RowKVCache
    rows: torch.Tensor
    positions: torch.Tensor
    spans: list[tuple[int, int]]
    bias: PositionBias | None = None

    def attend(self, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               scaling: float | None) -> torch.Tensor:
        """Packed prompts ([1, heads, tokens, dim]); each attends causally to its own span only."""
        self.cache.write(module.layer_idx, self.rows, self.positions, key[0].transpose(0, 1),
                         value[0].transpose(0, 1))
        outputs = [
            F.scaled_dot_product_attention(query[:, :, start:end], key[:, :, start:end], value[:, :, start:end],
                                           is_causal=self.bias is None, scale=scaling, enable_gqa=True,
                                           attn_mask=self.bias(end - start, end - start) if self.bias else None)
            for start, end in self.spans
        ]
        return torch.cat(outputs, dim=2).transpose(1, 2)


@dataclass
class DecodeStep:
    cache: RowKVCache
    rows: list[int]  # the cache row each query row reads and writes
    positions: torch.Tensor
    lengths: list[int]
    bias: PositionBias | None = None

    def __post_init__(self) -> None:
        self.row_tensor = torch.tensor(self.rows, device=self.positions.device)

    def attend(self, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               scaling: float | None) -> torch.Tensor:
        """One new token per row ([B, heads, 1, dim]), each attending to exactly its own cached length: on CPU
        all rows in one attend_rows call (without a position bias), elsewhere one by one, so that a row's result
        is bit-identical whatever its neighbours' lengths (a padded, masked batch changes the summation order
        inside the kernel). Query heads sharing a KV head are laid along the query axis, so K/V are never
        repeated or copied."""
        batch, heads, _, head_dim = query.shape
        cached_keys, cached_values = self.cache.write(module.layer_idx, self.row_tensor, self.positions,
                                                      key[:, :, 0], value[:, :, 0])
        if self.bias is None and runs_here(query):
            lengths = torch.tensor(self.lengths, device=query.device)
            return attend_cache_rows(query, cached_keys, cached_values, self.row_tensor, lengths, scaling)
        kv_heads = cached_keys.shape[1]
        grouped_query = query.reshape(batch, kv_heads, heads // kv_heads, head_dim)
        output = torch.cat([
            F.scaled_dot_product_attention(grouped_query[index:index + 1], cached_keys[row:row + 1, :, :length],
                                           cached_values[row:row + 1, :, :length], scale=scaling,
                                           attn_mask=self.bias(1, length) if self.bias else None)
            for index, (row, length) in enumerate(zip(self.rows, self.lengths))
        ])
        return output.reshape(batch, heads, 1, head_dim).transpose(1, 2)


@dataclass
class StaticRowStep:
    """One token per row of row caches allocated whole ([rows, kv_heads, max_length, head_dim] per layer, as a
    static Whisper cache keeps them): row i writes its K/V at (write_rows[i], positions[i]) (a padding row writes
    to a scratch row) and attends over all of cache row i with the positions from lengths[i] on masked out, so
    that every shape depends on the row count alone."""
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    write_rows: torch.Tensor  # [rows]
    positions: torch.Tensor  # [rows]
    lengths: torch.Tensor  # [rows]
    bias: torch.Tensor | None = None  # [rows, heads, 1, max_length]: an additive bias by position (T5's)

    def attend(self, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               scaling: float | None) -> torch.Tensor:
        """One token per row ([rows, heads, 1, dim]) over whole cache rows, each masked to its own length."""
        rows, heads = query.shape[0], query.shape[1]
        cached_keys, cached_values = self.keys[module.layer_idx], self.values[module.layer_idx]
        cached_keys[self.write_rows, :, self.positions] = key[:, :, 0]
        cached_values[self.write_rows, :, self.positions] = value[:, :, 0]
        if self.bias is None and runs_here(query):
            every_row = torch.arange(rows, device=query.device)
            return attend_cache_rows(query, cached_keys, cached_values, every_row, self.lengths, scaling)
        kv_heads, length = cached_keys.shape[1], cached_keys.shape[2]
        mask = (torch.arange(length, device=query.device) < self.lengths[:, None])[:, None, None, :]
        if self.bias is not None:  # per query head: laid out as _attend_grouped lays the queries
            mask = self.bias.masked_fill(~mask, float("-inf")).reshape(rows, kv_heads, heads // kv_heads, length)
        return _attend_grouped(query, cached_keys[:rows], cached_values[:rows], mask, scaling)


def pack_prompts(seqs: list[Sequence]) -> tuple[list[int], list[int], list[int], list[tuple[int, int]]]:
    """The sequences' tokens (their prompts, and what they had generated before a preemption) laid end to end:
    token ids, each token's position and row, and each sequence's span."""
    ids, positions, rows, spans = [], [], [], []
    for seq in seqs:
        spans.append((len(ids), len(ids) + seq.length))
        ids.extend(seq.all_ids)
        positions.extend(range(seq.length))
        rows.extend([seq.row] * seq.length)
    return ids, positions, rows, spans


def batchwise_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask: torch.Tensor | None, scaling: float | None = None,
                        batchwise_step: Step | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    if batchwise_step is None:
        raise RuntimeError("batchwise attention needs a batchwise_step argument (the model runner passes it)")
    return batchwise_step.attend(module, query, key, value, scaling), None


def attend_decoding(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None,
                    scale: float) -> torch.Tensor:
    """A few queries per row and head over many keys (decoding): query [rows, heads, queries, dim], keys and
    values [rows, heads, keys, dim], mask broadcast to [rows, heads, queries, keys] (True: attended, or an
    additive bias). SDPA, except in half precision on CPU, where SDPA's kernel costs 2-4x the plain products
    per (row, head) (measured in bfloat16 on an AVX512-BF16 CPU, one to three queries over 129 to 512 keys):
    there it computes as transformers' eager attention does, products in the model's dtype and the softmax in
    float32."""
    if query.device.type != "cpu" or query.dtype == torch.float32:
        return F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=scale)
    if mask is not None:
        mask = mask.expand(*query.shape[:-1], keys.shape[-2])
    return torch.stack([_attend_head(query[:, head], keys[:, head], values[:, head],
                                     None if mask is None else mask[:, head], scale)
                        for head in range(query.shape[1])], dim=1)


def _attend_head(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None,
                 scale: float) -> torch.Tensor:
    """One head of attend_decoding: [rows, queries, dim] over [rows, keys, dim]. Head by head, each row's keys
    form one matrix as the cache holds them, which batched products read in place; over [rows, heads] at once
    they are first copied (the static cache's 32 x 256 positions: 365 us a layer eagerly against 1090, 261
    against 407 compiled, in bfloat16 on an AVX512-BF16 CPU)."""
    scores = torch.bmm(query, keys.transpose(1, 2)).float() * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.float()
    return torch.bmm(scores.softmax(dim=-1).to(values.dtype), values)


def _attend_grouped(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                    scale: float) -> torch.Tensor:
    """One query per row and head ([rows, heads, 1, dim]) over [rows, kv_heads, keys, dim], with the query heads
    that share a KV head laid along the query axis (as SpanStep does): with bfloat16 on CPU, SDPA over
    [rows, heads, 1, dim] queries with enable_gqa measured 6x slower than over [rows, kv_heads, group, dim].
    Returns [rows, 1, heads, dim]."""
    rows, heads, _, head_dim = query.shape
    kv_heads = keys.shape[1]
    output = attend_decoding(query.reshape(rows, kv_heads, heads // kv_heads, head_dim), keys, values, mask, scale)
    return output.reshape(rows, heads, 1, head_dim).transpose(1, 2)


def attend_cache_rows(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, rows: torch.Tensor,
                      lengths: torch.Tensor, scale: float | None) -> torch.Tensor:
    """attend_rows over a row cache: query [n, heads, 1, dim], query i over the first lengths[i] positions of
    cache row rows[i] (keys, values: [cache rows, kv_heads, positions, dim]). Returns [n, 1, heads, dim]."""
    keys, per_row = row_cache_as_tokens(keys)
    values, _ = row_cache_as_tokens(values)
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    return attend_rows(query[:, :, 0], keys, values, rows * per_row, lengths, scale)[:, None]


def kv_layout(model: torch.nn.Module) -> KVLayout:
    """The K/V shape every layer stores and where, learned by running one token through the model."""
    step = ProbeStep()
    ids = torch.zeros((1, 1), dtype=torch.long, device=model.device)
    with torch.inference_mode():
        model(input_ids=ids, position_ids=ids, use_cache=False, batchwise_step=step)
    shapes = set(step.shapes.values())
    if len(shapes) != 1:
        raise ValueError(f"the engine needs every layer to keep K/V of one shape, got {sorted(map(str, shapes))}")
    kv_heads, head_dim, dtype = shapes.pop()
    return KVLayout(kv_heads, head_dim, dtype, tuple(step.devices[layer] for layer in sorted(step.devices)))


def _no_mask(*args, **kwargs) -> None:
    return None


AttentionInterface.register(ATTENTION_NAME, batchwise_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION_NAME, _no_mask)
