"""Word timestamps from Whisper's own cross-attention, as OpenAI's timing.py finds them: the alignment heads'
attention of each chosen text token over the window's audio is normalised per head, median-filtered along
time and averaged over the heads; dynamic time warping then walks the tokens through the audio, and the
moment the path reaches a word's first token is where the word starts (the next word's, where it ends)."""

from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

POSITIONS_PER_SECOND = 50  # encoder positions: two 10 ms mel frames each
MEDIAN_FILTER_WIDTH = 7
UNSPACED_LANGUAGES = {"zh", "ja", "th", "lo", "my", "yue"}  # words are tokens there
PUNCTUATION = set(string.punctuation) | set("¿¡“”‘’«»。，、！？：；")
LONGEST_MEDIAN_WORD = 0.7  # seconds; a word may last twice the window's median word, at most twice this


@dataclass
class TimedWord:
    word: str
    start: float  # seconds from the window's start
    end: float
    first_text_token: int  # index among the window's text tokens


def median_filter(values: torch.Tensor, width: int) -> torch.Tensor:
    """Along the last axis, reflecting at the edges; values: [heads, tokens, positions]."""
    pad = width // 2
    if values.shape[-1] <= pad:
        return values
    return F.pad(values, (pad, pad), mode="reflect").unfold(-1, width, 1).median(dim=-1).values


def dtw(cost: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The cheapest monotonic path through cost [tokens, positions] from its first cell to its last: the
    token and position index of each step. Cells on one anti-diagonal depend only on the two before it,
    so each diagonal is filled at once."""
    rows, columns = cost.shape
    total = np.full((rows + 1, columns + 1), np.inf)
    total[0, 0] = 0
    came_from = np.zeros((rows + 1, columns + 1), dtype=np.int8)  # 0: diagonal, 1: from above, 2: from the left
    for diagonal in range(2, rows + columns + 1):
        i = np.arange(max(1, diagonal - columns), min(rows, diagonal - 1) + 1)
        j = diagonal - i
        candidates = np.stack([total[i - 1, j - 1], total[i - 1, j], total[i, j - 1]])
        came_from[i, j] = candidates.argmin(axis=0)
        total[i, j] = cost[i - 1, j - 1] + candidates.min(axis=0)
    came_from[0, :], came_from[:, 0] = 2, 1
    path, i, j = [], rows, columns
    while i > 0 or j > 0:
        path.append((i - 1, j - 1))
        step = came_from[i, j]
        i, j = (i - 1, j - 1) if step == 0 else (i - 1, j) if step == 1 else (i, j - 1)
    tokens, positions = np.array(path[::-1]).T
    return tokens, positions


def token_start_times(scores: torch.Tensor) -> np.ndarray:
    """scores: [heads, tokens, positions], raw query-key scores. When the alignment path reaches each token."""
    weights = scores.softmax(dim=-1)
    std, mean = torch.std_mean(weights, dim=-2, keepdim=True, unbiased=False)
    weights = median_filter((weights - mean) / std.clamp_min(1e-9), MEDIAN_FILTER_WIDTH)
    tokens, positions = dtw(-weights.mean(dim=0).double().numpy())
    jumps = np.diff(tokens, prepend=-1).astype(bool)
    return positions[jumps] / POSITIONS_PER_SECOND


def word_groups(text_tokens: list[int], decode: Callable[[list[int]], str], language: str) -> list[list[int]]:
    """Indices into text_tokens, one list per word: a word starts at a token that starts with a space, and
    punctuation stays with the word before it. Where words are not spaced, a word is a character: tokens
    are joined until they decode to whole characters (byte-level tokens may split one)."""
    groups: list[list[int]] = []
    for index, token in enumerate(text_tokens):
        text = decode([token])
        if groups and "\ufffd" in decode([text_tokens[i] for i in groups[-1]]):
            groups[-1].append(index)  # the word so far ends inside a character
            continue
        starts_word = language in UNSPACED_LANGUAGES or text.startswith(" ")
        punctuation = bool(text.strip()) and all(c in PUNCTUATION for c in text.strip())
        if groups and (punctuation or not starts_word):
            groups[-1].append(index)
        else:
            groups.append([index])
    return groups


def align_words(scores: list[torch.Tensor], tokens: list[int], end_of_text: int,
                decode: Callable[[list[int]], str], language: str) -> list[TimedWord]:
    """The timed words of one decoded window. scores[k]: the alignment heads' scores ([heads, positions]) of
    the query that chose tokens[k]; text tokens are those before <|endoftext|> in the vocabulary, and the
    token after the last one (a timestamp or the end) marks where the speech stops."""
    text_indices = [k for k, token in enumerate(tokens) if token < end_of_text]
    if not text_indices:
        return []
    closing = [text_indices[-1] + 1] if text_indices[-1] + 1 < len(scores) else []
    rows = text_indices + closing
    starts = token_start_times(torch.stack([scores[k] for k in rows], dim=1).cpu())
    text_tokens = [tokens[k] for k in text_indices]
    last_position = scores[0].shape[-1] / POSITIONS_PER_SECOND
    words = []
    for group in word_groups(text_tokens, decode, language):
        after = group[-1] + 1
        end = starts[after] if after < len(starts) else last_position
        words.append(TimedWord(decode([text_tokens[i] for i in group]), float(starts[group[0]]), float(end),
                               group[0]))
    shorten_words_at_pauses(words)
    return words


def shorten_words_at_pauses(words: list[TimedWord]) -> None:
    """The alignment path lingers on the word before a pause (the path ends where the audio does), and every
    window's path starts at 0 s, however late the speech begins: a word longer than twice the window's
    median word (OpenAI's rule) loses the pause, on its end, or on its start when it opens the window."""
    durations = [word.end - word.start for word in words if word.end > word.start]
    if not durations:
        return
    longest = 2 * min(LONGEST_MEDIAN_WORD, float(np.median(durations)))
    for index, word in enumerate(words):
        if word.end - word.start > longest:
            if index == 0:
                word.start = word.end - longest
            else:
                word.end = word.start + longest
