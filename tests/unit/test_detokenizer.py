import random

import pytest

from batching import SamplingParams, Sequence, TokenLogprob
from batching.detokenizer import IncrementalDetokenizer, StopStringMatcher

TEXTS = [
    "Hello world, this is a plain sentence.",
    "Ünïcödé: café, naïve, 東京タワー, and emoji 🎉🚀 with spaces  and\nnewlines\ttabs.",
    "  leading spaces and trailing ones  ",
    "code: def f(x):\n    return x ** 2  # squared",
]


@pytest.mark.parametrize("text", TEXTS)
def test_incremental_text_equals_full_decode(tokenizer, text):
    prompt = tokenizer("A prompt before the answer:").input_ids
    ids = tokenizer(text, add_special_tokens=False).input_ids
    detokenizer = IncrementalDetokenizer(tokenizer, prompt)
    pieces = [detokenizer.add(i) for i in ids] + [detokenizer.flush()]
    assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True)
    assert not any("\ufffd" in piece for piece in pieces[:-1])


def test_multibyte_characters_are_held_until_complete(tokenizer):
    ids = tokenizer("🎉", add_special_tokens=False).input_ids
    assert len(ids) > 1, "the emoji should span several byte tokens"
    detokenizer = IncrementalDetokenizer(tokenizer, [])
    pieces = [detokenizer.add(i) for i in ids]
    assert pieces[:-1] == [""] * (len(ids) - 1) and pieces[-1] == "🎉"


def test_special_tokens_are_dropped_unless_shown(tokenizer):
    """A tool-call parser may need a special marker (Mistral's [TOOL_CALLS]); here <|im_start|> stands in."""
    marker = tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert marker in tokenizer.all_special_ids
    ids = [marker, *tokenizer("hello there", add_special_tokens=False).input_ids, marker]
    for shown, expected in [({}, "hello there"), ({marker: "<|im_start|>"}, "<|im_start|>hello there<|im_start|>")]:
        detokenizer = IncrementalDetokenizer(tokenizer, [], shown)
        assert "".join(detokenizer.add(i) for i in ids) + detokenizer.flush() == expected


def feed_all(matcher: StopStringMatcher, chunks: list[str]) -> tuple[str, bool]:
    emitted = []
    for chunk in chunks:
        text, stopped = matcher.feed(chunk)
        emitted.append(text)
        if stopped:
            return "".join(emitted), True
    return "".join(emitted) + matcher.flush(), False


@pytest.mark.parametrize("chunks, stops, expected", [
    (["Hello ", "wor", "ld", " again"], ["world"], ("Hello ", True)),
    (["abc", "d<", "/st", "op>", "tail"], ["</stop>"], ("abcd", True)),
    (["no stop", " here"], ["zzz"], ("no stop here", False)),
    (["x", "E", "N", "Y"], ["END", "NY"], ("xE", True)),
    (["partial EN"], ["END"], ("partial EN", False)),
    (["a\n\nb"], ["\n\n"], ("a", True)),
])
def test_stop_strings_across_chunks(chunks, stops, expected):
    assert feed_all(StopStringMatcher(stops), chunks) == expected


def test_partial_stop_is_never_emitted_early():
    matcher = StopStringMatcher(["STOP"])
    assert matcher.feed("go ST") == ("go ", False)
    assert matcher.feed("O") == ("", False)
    assert matcher.feed("RM") == ("STORM", False)


def test_random_splits_give_the_same_cut():
    rng = random.Random(0)
    text = "The answer is 42.### and more text after the marker ###"
    for _ in range(200):
        cuts = sorted(rng.sample(range(1, len(text)), 6))
        chunks = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
        assert feed_all(StopStringMatcher(["###"]), chunks) == ("The answer is 42.", True)


def make_sequence(tokenizer, stop=(), max_tokens=50) -> Sequence:
    prompt = tokenizer("Say something:").input_ids
    return Sequence(prompt, SamplingParams(max_tokens=max_tokens, stop=tuple(stop)),
                    IncrementalDetokenizer(tokenizer, prompt), frozenset({tokenizer.eos_token_id}))


def test_sequence_stop_string_spanning_tokens_is_cut_and_finishes(tokenizer):
    ids = tokenizer("Paris is lovely. END of answer", add_special_tokens=False).input_ids
    seq = make_sequence(tokenizer, stop=["END of"])
    deltas = []
    for token in ids:
        deltas.append(seq.append_token(TokenLogprob(token, 0.0)))
        if deltas[-1].finish_reason:
            break
    assert "".join(d.text for d in deltas) == "Paris is lovely. "
    assert deltas[-1].finish_reason == "stop" and seq.finished


def test_sequence_eos_and_length(tokenizer):
    ids = tokenizer("one two three", add_special_tokens=False).input_ids
    seq = make_sequence(tokenizer)
    texts = [seq.append_token(TokenLogprob(t, 0.0)).text for t in ids]
    eos = seq.append_token(TokenLogprob(tokenizer.eos_token_id, 0.0))
    assert "".join(texts) == "one two three" and eos.finish_reason == "stop" and eos.text == ""

    seq = make_sequence(tokenizer, max_tokens=2, stop=["thr"])
    first, second = (seq.append_token(TokenLogprob(t, 0.0)) for t in ids[:2])
    assert second.finish_reason == "length" and first.text + second.text == "one two"
