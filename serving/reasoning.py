"""R1-style reasoning: split <think>...</think> from the answer, and the reference proxy's r1_settings."""

from __future__ import annotations

from dataclasses import dataclass

from batching.detokenizer import partial_suffix_length

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


@dataclass
class Split:
    reasoning: str = ""
    content: str = ""


class ReasoningParser:
    """Streams text in, reasoning and content out. A tag split across deltas is held back until it
    is whole, so neither side ever shows part of a tag."""

    def __init__(self, opened_by_template: bool) -> None:
        self.thinking = opened_by_template
        self.may_open = not opened_by_template  # a think block may still open at the very start
        self.buffer = ""

    def feed(self, text: str) -> Split:
        self.buffer += text
        split = Split()
        if self.may_open and not self._resolve_opening():
            return split
        if self.thinking:
            self._take_reasoning(split)
        if not self.thinking:
            split.content += self.buffer
            self.buffer = ""
        return split

    def finish(self) -> Split:
        text, self.buffer = self.buffer, ""
        return Split(reasoning=text) if self.thinking else Split(content=text)

    def _resolve_opening(self) -> bool:
        stripped = self.buffer.lstrip()
        if len(stripped) < len(THINK_OPEN) and THINK_OPEN.startswith(stripped):
            return False
        self.may_open = False
        if stripped.startswith(THINK_OPEN):
            self.thinking = True
            self.buffer = stripped[len(THINK_OPEN):]
        return True

    def _take_reasoning(self, split: Split) -> None:
        index = self.buffer.find(THINK_CLOSE)
        if index >= 0:
            split.reasoning += self.buffer[:index]
            self.buffer = self.buffer[index + len(THINK_CLOSE):]
            self.thinking = False
            return
        keep = len(self.buffer) - partial_suffix_length(self.buffer, [THINK_CLOSE])
        split.reasoning += self.buffer[:keep]
        self.buffer = self.buffer[keep:]


def template_opens_think(rendered_generation_prompt: str) -> bool:
    return rendered_generation_prompt.rstrip().endswith(THINK_OPEN)


def apply_few_shot_mode(messages: list[dict[str, str]], mode: str) -> list[dict[str, str]]:
    """DROP keeps the last user turn, prefixed with the system prompt; PREPROCESS folds the whole
    dialogue into one user turn; NO_PREPROCESS leaves it as it is."""
    if mode == "NO_PREPROCESS":
        return messages
    system = "\n\n".join(m["content"] for m in messages if m["role"] in ("system", "developer"))
    if mode == "DROP":
        last_user = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
        return [{"role": "user", "content": f"{system}\n\n{last_user}" if system else last_user}]
    dialogue = "\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages
                         if m["role"] not in ("system", "developer"))
    return [{"role": "user", "content": f"{system}\n\n{dialogue}" if system else dialogue}]


def add_math_instruction(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=None)
    if last_user is None:
        return [*messages, {"role": "user", "content": MATH_INSTRUCTION}]
    updated = dict(messages[last_user], content=f"{messages[last_user]['content']}\n\n{MATH_INSTRUCTION}")
    return [*messages[:last_user], updated, *messages[last_user + 1:]]


def boxed_answer(text: str) -> str | None:
    """The content of the last \\boxed{...}, braces balanced; None when there is none."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, begin = 0, start + len("\\boxed{")
    for index in range(begin, len(text)):
        if text[index] == "{":
            depth += 1
        elif text[index] == "}":
            if depth == 0:
                return text[begin:index]
            depth -= 1
    return None
