import itertools

import pytest

from serving.reasoning import (MATH_INSTRUCTION, ReasoningParser, add_math_instruction, apply_few_shot_mode,
                               boxed_answer, template_opens_think)


def parse(chunks: list[str], opened: bool) -> tuple[str, str]:
    parser = ReasoningParser(opened)
    splits = [parser.feed(chunk) for chunk in chunks] + [parser.finish()]
    return "".join(s.reasoning for s in splits), "".join(s.content for s in splits)


def every_split(text: str, pieces: int = 3):
    for cuts in itertools.combinations(range(1, len(text)), pieces - 1):
        bounds = [0, *cuts, len(text)]
        yield [text[a:b] for a, b in zip(bounds, bounds[1:])]


@pytest.mark.parametrize("text, opened, expected", [
    ("<think>step one</think>The answer.", False, ("step one", "The answer.")),
    ("step one</think>The answer.", True, ("step one", "The answer.")),
    ("  <think>a</think>b", False, ("a", "b")),
    ("Just an answer.", False, ("", "Just an answer.")),
    ("Answer with <think> inside", False, ("", "Answer with <think> inside")),
    ("still thinking", True, ("still thinking", "")),
    ("a</think>b</think>c", True, ("a", "b</think>c")),
])
def test_tags_split_reasoning_from_content_however_the_text_is_chunked(text, opened, expected):
    assert parse([text], opened) == expected
    for chunks in every_split(text):
        assert parse(chunks, opened) == expected, chunks


def test_a_stream_never_shows_part_of_a_tag():
    parser = ReasoningParser(opened_by_template=True)
    shown = [parser.feed(c) for c in ["x </th", "in", "k>y"]]
    assert [(s.reasoning, s.content) for s in shown] == [("x ", ""), ("", ""), ("", "y")]


def test_template_detection():
    assert template_opens_think("<|im_start|>assistant\n<think>\n")
    assert not template_opens_think("<|im_start|>assistant\n")


DIALOGUE = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "3+3?"},
]


def test_few_shot_modes():
    assert apply_few_shot_mode(DIALOGUE, "NO_PREPROCESS") == DIALOGUE
    assert apply_few_shot_mode(DIALOGUE, "DROP") == [{"role": "user", "content": "Be brief.\n\n3+3?"}]
    folded = apply_few_shot_mode(DIALOGUE, "PREPROCESS")
    assert folded == [{"role": "user", "content": "Be brief.\n\nUser: 2+2?\nAssistant: 4\nUser: 3+3?"}]


def test_math_mode_instruction_and_boxed_answer():
    updated = add_math_instruction(DIALOGUE)
    assert updated[-1]["content"] == f"3+3?\n\n{MATH_INSTRUCTION}" and updated[:-1] == DIALOGUE[:-1]
    assert boxed_answer(r"so \boxed{1} then \boxed{\frac{1}{2}}.") == r"\frac{1}{2}"
    assert boxed_answer("no box here") is None
    assert boxed_answer(r"\boxed{unclosed") is None
