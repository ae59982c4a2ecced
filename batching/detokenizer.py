"""Token ids to text, one token at a time, and stop strings that may span several tokens."""

from __future__ import annotations

from typing import Mapping, Protocol, Sequence

PROMPT_CONTEXT_TOKENS = 4


class Decoder(Protocol):
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = ...) -> str: ...


class IncrementalDetokenizer:
    """Releases text only once it is final: never half a UTF-8 character, and with the spacing the
    whole sequence would decode to (SentencePiece drops a leading space when decoding a lone token,
    so the last few prompt tokens are kept as context). Special tokens are dropped, except those in
    `shown` (id to text): a tool-call parser may need to see a marker such as Mistral's [TOOL_CALLS]."""

    def __init__(self, tokenizer: Decoder, prompt_ids: Sequence[int], shown: Mapping[int, str] | None = None) -> None:
        self.tokenizer = tokenizer
        self.shown = shown or {}
        self.ids = list(prompt_ids[-PROMPT_CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        prefix_text, new_text = self._decode_window()
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return new_text[len(prefix_text):]

    def flush(self) -> str:
        prefix_text, new_text = self._decode_window()
        self.prefix_offset = self.read_offset = len(self.ids)
        return new_text[len(prefix_text):]

    def _decode_window(self) -> tuple[str, str]:
        return self._text(self.ids[self.prefix_offset:self.read_offset]), self._text(self.ids[self.prefix_offset:])

    def _text(self, ids: list[int]) -> str:
        decode = self.tokenizer.decode
        if not self.shown:
            return decode(ids, skip_special_tokens=True)
        parts, run = [], []
        for token_id in ids:
            if token_id in self.shown:
                parts += [decode(run, skip_special_tokens=True), self.shown[token_id]]
                run = []
            else:
                run.append(token_id)
        return "".join(parts) + decode(run, skip_special_tokens=True)


class StopStringMatcher:
    """Holds back any tail of the text that could be the start of a stop string, so a stream never
    shows part of a stop string, and cuts the text where the first stop string begins."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.held = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Return (text that is safe to emit, whether a stop string was found)."""
        if not self.stops:
            return text, False
        buffer = self.held + text
        cut = min((i for i in (buffer.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.held = ""
            return buffer[:cut], True
        keep = partial_suffix_length(buffer, self.stops)
        self.held = buffer[len(buffer) - keep:] if keep else ""
        return buffer[:len(buffer) - keep], False

    def flush(self) -> str:
        held, self.held = self.held, ""
        return held


def partial_suffix_length(text: str, candidates: Sequence[str]) -> int:
    """Length of the longest tail of text that is the start (not the whole) of some candidate."""
    for size in range(min(len(text), max(map(len, candidates)) - 1), 0, -1):
        tail = text[-size:]
        if any(c.startswith(tail) for c in candidates):
            return size
    return 0
