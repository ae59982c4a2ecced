"""Model forwards for one engine step: every sequence's span (a prompt chunk, or one decoding token and perhaps a
draft of the tokens after it) packed into a single [1, tokens] forward, then a token sampled for each span that
reached its sequence's end (with a draft, the draft verified: batching.speculative).
With a static cache, a step the static-shape decode step takes (decoding rows, and on CPU prompt chunks
beside them: batching.static_decode) runs there instead; in batch-invariant mode the decoding rows of every
step that it takes do."""

from __future__ import annotations

from collections import deque
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from batching.attention import PackedSpan, SpanStep
from batching.kv_arena import KVArena
from batching.lora import NO_ADAPTER, LoraLayers
from batching.sampler import sample, token_logprobs
from batching.scheduler import Span
from batching.sequence import Pooled, TokenLogprob
from batching.speculative import Drafter, verify
from batching.static_decode import StaticDecoder
from batching.vision import ImageInputs, PicturedSpan, embed_with_images, encode_images


# MKL's reproducible mode (MKL_CBWR=AUTO,STRICT) gives a matmul row the same result whatever the number of
# rows, from 4 rows up (measured: 1, 2 and 3 rows each round differently), so batch-invariant forwards never
# run fewer rows than this: padding tokens fill them up.
MIN_INVARIANT_ROWS = 4


@contextmanager
def final_hidden_states(model: PreTrainedModel, capture: bool) -> Iterator[list[torch.Tensor]]:
    """A list that receives the [tokens, hidden] final hidden states of the model's forward run inside (its base
    model's output, after the final norm), when `capture`."""
    captured: list[torch.Tensor] = []
    if not capture:
        yield captured
        return
    handle = model.base_model.register_forward_hook(
        lambda module, args, output: captured.append(output.last_hidden_state[0]))
    try:
        yield captured
    finally:
        handle.remove()


def min_rows(batch_invariant: bool) -> int:
    """The fewest rows a forward runs: MIN_INVARIANT_ROWS in batch-invariant mode, else one."""
    return MIN_INVARIANT_ROWS if batch_invariant else 1


class ModelRunner:
    def __init__(self, model: PreTrainedModel, arena: KVArena, static: StaticDecoder | None = None,
                 batch_invariant: bool = False, drafter: Drafter | None = None, lora: LoraLayers | None = None
                 ) -> None:
        self.model = model
        self.lora = lora
        self.arena = arena
        self.static = static
        self.drafter = drafter
        self.batch_invariant = batch_invariant
        self.min_rows = min_rows(batch_invariant)
        self.device = model.device
        # where the logits are computed: another device than the input's when a device map spreads the model
        self.head_device = model.get_output_embeddings().weight.device

    @torch.inference_mode()
    def step(self, spans: list[Span]) -> list[list[TokenLogprob | Pooled]]:
        """What each span that samples or pools emits, in span order: one token, or for a span with a draft, the
        draft tokens the model accepts and one more (batching.speculative); a pooled prompt's embedding."""
        if self.drafter is not None and any(span.draft_room for span in spans):
            self.drafter.draft(spans)
        if any(span.draft for span in spans):
            tokens, embeddings = self._verify_drafts(spans)
        else:
            logits, embeddings = self._next_token_logits(spans)
            seqs = [span.seq for span in spans if span.samples]
            tokens = [[token] for token in sample(logits.float(), seqs)] if seqs else []
        tokens, embeddings = deque(tokens), deque(embeddings)
        return [[embeddings.popleft()] if span.pools else tokens.popleft() for span in spans if span.emits]

    def _verify_drafts(self, spans: list[Span]) -> tuple[list[list[TokenLogprob]], list[Pooled]]:
        """A step with drafts runs in the static step where it takes them (each token a row of its own), else
        packed: rows without a draft sample together as in any step, rows with one verify it from the logits at
        each of its positions."""
        if self.static is not None and self.static.takes(spans):
            logits, embeddings = self.static.draft_logits(spans), []
        else:
            logits, embeddings = self._packed_logits(spans)
        sampling = [span for span in spans if span.samples]
        plain = [index for index, span in enumerate(sampling) if not span.draft]
        emitted: dict[int, list[TokenLogprob]] = {}
        if plain:
            tokens = sample(torch.stack([logits[index][-1] for index in plain]).float(),
                            [sampling[index].seq for index in plain])
            emitted.update((index, [token]) for index, token in zip(plain, tokens))
        for index, span in enumerate(sampling):
            if span.draft:
                emitted[index] = verify(logits[index].float(), span.seq, span.draft)
        return [emitted[index] for index in range(len(sampling))], embeddings

    def warm_up(self, on_ready: Callable[[int, int], None]) -> None:
        """On the torch thread, before serving: compile (and record CUDA graphs for) the static decode step;
        on_ready(batch sizes ready, all of them) after each."""
        if self.static is not None:
            self.static.warm_up(on_ready)

    def _next_token_logits(self, spans: list[Span]) -> tuple[torch.Tensor, list[Pooled]]:
        """[spans that sample, vocab], in span order: from the static step when it takes the whole step, else from
        the packed forward, but for the decoding rows in batch-invariant mode, which the static step takes (batch
        invariance needs every decode to attend the same way) unless they are long rows it declines; and the
        embeddings of the spans that pool (which the packed forward computes)."""
        if self.static is not None and self.static.takes(spans):
            return self.static.logits(spans), []
        invariant = self.static is not None and self.batch_invariant
        static = [i for i, span in enumerate(spans) if span.seq.decoding and self.static.takes([span])] \
            if invariant else []
        packed = sorted(set(range(len(spans))) - set(static))
        packed_logits, embeddings = self._packed_logits([spans[i] for i in packed])
        next_token_logits: dict[int, torch.Tensor] = dict(zip(
            [i for i in packed if spans[i].samples], (logits[-1] for logits in packed_logits)))
        if static:
            next_token_logits.update(zip(static, self.static.logits([spans[i] for i in static])))
        sampling = [next_token_logits[i] for i, span in enumerate(spans) if span.samples]
        return torch.stack(sampling) if sampling else torch.empty(0), embeddings

    def _packed_logits(self, spans: list[Span]) -> tuple[list[torch.Tensor], list[Pooled]]:
        """One [1, tokens] forward over the spans (and their drafts); for each span that samples, in order, the
        logits at its last token and at each of its draft tokens ([1 + draft, vocab]); for each span that pools,
        its last token's final hidden state (what the LM head reads), normalised: vLLM's pooling of decoders."""
        ids, positions, slots, attention_spans, kept, pictured, pooled = [], [], [], [], [], [], []
        adapters = []  # each token's LoRA slot
        for span in spans:
            seq, start = span.seq, len(ids)
            if isinstance(seq.inputs, ImageInputs):
                pictured.append(PicturedSpan(seq, start, span.start, span.end))
            ids.extend(seq.all_ids[span.start:span.end])
            if span.pools:
                pooled.append(len(ids) - 1)
            ids.extend(span.draft)
            positions.extend(range(span.start, span.stop))
            slots.extend(range(seq.kv.start + span.start, seq.kv.start + span.stop))
            attention_spans.append(PackedSpan(start, len(ids), seq.kv.start, span.stop))
            kept.extend(start + p - span.start for p in self._logit_positions(span))
            adapters.extend([seq.adapter_slot] * (len(ids) - start))
        self._pad(ids, positions, slots, attention_spans, kept)
        adapters.extend([NO_ADAPTER] * (len(ids) - len(adapters)))
        token_inputs = self._token_inputs(self._tensor(ids), pictured)
        step = SpanStep(self.arena, self._tensor(slots), attention_spans)
        with self._adapters(adapters), final_hidden_states(self.model, capture=bool(pooled)) as hidden:
            logits = self.model(**token_inputs, position_ids=self._position_ids(positions, pictured),
                                logits_to_keep=torch.tensor(kept, device=self.head_device), use_cache=False,
                                batchwise_step=step).logits[0]
        next_token_logits, offset = [], 0
        for span in spans:
            count = len(self._logit_positions(span))
            span_logits = logits[offset:offset + count]
            offset += count
            if span.seq.params.prompt_logprobs:
                self._record_prompt_logprobs(span, span_logits)
            if span.samples:
                next_token_logits.append(span_logits[-1 - len(span.draft):])
        embeddings = F.normalize(hidden[0][pooled].float(), dim=-1).cpu().numpy() if pooled else []
        return next_token_logits, [Pooled(vector) for vector in embeddings]

    def _adapters(self, adapters: list[int]) -> AbstractContextManager:
        """Each token's LoRA adapter for the forward's LoRA layers, if the model has them."""
        if self.lora is None:
            return nullcontext()
        return self.lora.selected(adapters, self.device, self.model.dtype)

    def _token_inputs(self, ids: torch.Tensor, pictured: list[PicturedSpan]) -> dict:
        """The forward's token ids, or with images among them, embeddings with the images' features written over
        their placeholders (the vision tower runs first for the sequences whose images it has not seen)."""
        if not pictured:
            return {"input_ids": ids[None]}
        unseen = list({piece.seq: None for piece in pictured if piece.seq.inputs.features is None})
        if unseen:
            encode_images(self.model, unseen)
        return {"inputs_embeds": embed_with_images(self.model, ids, pictured)[None]}

    def _position_ids(self, positions: list[int], pictured: list[PicturedSpan]) -> torch.Tensor:
        """[1, tokens]; or where a sequence's images have 3-D rotary positions (after _token_inputs has found
        them), [3, 1, tokens], with text-only sequences' positions alike on all three axes."""
        flat = self._tensor(positions)[None]
        spatial = [piece for piece in pictured if piece.seq.inputs.rope_positions is not None]
        if not spatial:
            return flat
        rows = flat.expand(3, -1).clone()
        for seq, offset, start, end in spatial:
            rows[:, offset:offset + end - start] = seq.inputs.position_rows(start, end)
        return rows[:, None]

    def _pad(self, ids: list[int], positions: list[int], slots: list[int], attention_spans: list[PackedSpan],
             kept: list[int]) -> None:
        """Fill the forward and its kept logits up to `min_rows` rows: padding tokens form a span of their own
        that writes to the arena's scratch positions; extra kept rows repeat the last one and are dropped."""
        missing = self.min_rows - len(ids)
        if missing > 0:
            start, scratch = len(ids), self.arena.scratch.start
            ids.extend([0] * missing)
            positions.extend(range(missing))
            slots.extend(range(scratch, scratch + missing))
            attention_spans.append(PackedSpan(start, start + missing, scratch, missing))
        kept.extend([kept[-1] if kept else 0] * (self.min_rows - len(kept)))

    @staticmethod
    def _prompt_targets(span: Span) -> range:
        """Positions in the span whose logits score the prompt's next token (for echoed prompt logprobs)."""
        if not span.seq.params.prompt_logprobs:
            return range(0)
        return range(span.start, min(span.end, len(span.seq.prompt_ids) - 1))

    def _logit_positions(self, span: Span) -> list[int]:
        positions = list(self._prompt_targets(span))
        if span.samples:
            positions.extend(range(span.end - 1, span.stop))
        return positions

    def _record_prompt_logprobs(self, span: Span, span_logits: torch.Tensor) -> None:
        seq, targets = span.seq, self._prompt_targets(span)
        if span.start == 0:
            seq.prompt_logprobs = [None]
        if targets:
            ids = [seq.prompt_ids[p + 1] for p in targets]
            seq.prompt_logprobs.extend(token_logprobs(span_logits[:len(targets)].float(), ids,
                                                      [seq.params.logprobs or 0] * len(ids)))

    def _tensor(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)
