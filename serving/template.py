"""A model's chat template and what it implies: how a dialogue (and its tools) becomes prompt text and ids,
which tool-call format and think markers the model writes, and, for a vision-language model, its processor."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from PIL.Image import Image

from batching.vision import ImageInputs, image_inputs
from serving.reasoning import ReasoningParser, template_opens_think
from serving.tool_parsers import ToolFormat, detect_format

PROBE_DIALOGUE = [{"role": "user", "content": "hi"}]
PROBE_TOOL = {"type": "function", "function": {"name": "probe", "parameters": {"type": "object"}}}


@dataclass(frozen=True)
class PromptEnding:
    """How a rendered chat ends, and whether the tokenizer's special tokens go on top of what the template writes:
    chat completions' defaults; /tokenize lets a client choose (vLLM's fields)."""
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False


class ChatTemplate:
    def __init__(self, tokenizer, processor, encoder_decoder: bool, image_token_id: int | None,
                 reasoning_parser: str = "auto", tool_call_parser: str = "auto", chat_template: str | None = None
                 ) -> None:
        self.tokenizer = tokenizer
        self.processor = processor  # a vision-language model's
        self.encoder_decoder = encoder_decoder
        self.image_token_id = image_token_id
        # a vision-language model's template often lives on its processor rather than its tokenizer
        self.source = chat_template or getattr(processor, "chat_template", None) or tokenizer.chat_template
        self.think_opened = self._think_opened(reasoning_parser)
        self.tool_format: ToolFormat = detect_format(self.source, tool_call_parser)
        self.renders_tools = self._renders_tools()
        self.tool_marker_tokens = self._special_tokens(self.tool_format.markers)

    @property
    def renders_chats(self) -> bool:
        """An encoder-decoder model without a template still takes a chat, as plain dialogue."""
        return bool(self.source) or self.encoder_decoder

    @property
    def reads_images(self) -> bool:
        return self.processor is not None

    def reasoning_parser(self, template_kwargs: Mapping[str, Any] | None = None) -> ReasoningParser | None:
        """A parser for one reply's think block; None when reasoning is not split off. A request's template
        variables may switch the think block (Qwen3's enable_thinking): the template is asked again with them."""
        if self.think_opened is None:
            return None
        return ReasoningParser(self._opens_think(template_kwargs) if template_kwargs else self.think_opened)

    def render(self, messages: list[dict], tools: list[dict] | None = None, ending: PromptEnding = PromptEnding(),
               template_kwargs: Mapping[str, Any] | None = None) -> str:
        """The dialogue as the template writes it; template_kwargs: a request's variables for the template."""
        if not self.source and self.encoder_decoder:
            return plain_dialogue(messages)
        return self.tokenizer.apply_chat_template(messages, tools=tools or None, chat_template=self.source,
                                                  add_generation_prompt=ending.add_generation_prompt,
                                                  continue_final_message=ending.continue_final_message, tokenize=False,
                                                  **(template_kwargs or {}))

    def prompt_ids(self, text: str, ending: PromptEnding = PromptEnding()) -> list[int]:
        return self.tokenizer(text, add_special_tokens=ending.add_special_tokens or self.adds_special_tokens(text)
                              ).input_ids

    def adds_special_tokens(self, text: str) -> bool:
        """Whether a rendered chat takes the tokenizer's special tokens: a decoder's chat template writes its own;
        an encoder's input takes them (T5's closing </s>, BART's <s> ... </s>); a vision-language model's prompt
        takes them unless its template began with BOS, as transformers' processors decide."""
        if self.processor is not None:
            bos = self.tokenizer.bos_token
            return not (bos and text.startswith(bos))
        return self.encoder_decoder

    def process(self, text: str, images: list[Image], ending: PromptEnding = PromptEnding()) -> Mapping[str, Any]:
        """A rendered chat and its images through the model's processor; it makes tensors: call it on the torch
        thread."""
        return self.processor(text=text, images=images, return_tensors="pt",
                              add_special_tokens=ending.add_special_tokens or self.adds_special_tokens(text))

    def image_inputs(self, processed: Mapping[str, Any]) -> ImageInputs:
        return image_inputs(processed, self.image_token_id)

    def _opens_think(self, template_kwargs: Mapping[str, Any]) -> bool:
        try:
            return template_opens_think(self.render(PROBE_DIALOGUE, template_kwargs=template_kwargs))
        except Exception:  # a template that takes the request's dialogue but not the probe's: as without variables
            return bool(self.think_opened)

    def _think_opened(self, parser: str) -> bool | None:
        """None: no reasoning parsing; otherwise whether the chat template itself opens the think block."""
        if parser == "none" or not self.source:
            return None
        opened = template_opens_think(self.render(PROBE_DIALOGUE))
        return opened if parser == "deepseek_r1" or opened else None

    def _renders_tools(self) -> bool:
        """Whether the chat template shows tools to the model (if not, the prompt describes them)."""
        if not self.source:
            return False
        try:
            return self.render(PROBE_DIALOGUE, [PROBE_TOOL]) != self.render(PROBE_DIALOGUE)
        except Exception:  # a template that fails on tools does not render them
            return False

    def _special_tokens(self, texts: tuple[str, ...]) -> tuple[tuple[int, str], ...]:
        """Those texts that are single special tokens (which the detokeniser would otherwise drop)."""
        special = set(self.tokenizer.all_special_ids)
        ids = [(self.tokenizer.convert_tokens_to_ids(text), text) for text in texts]
        return tuple((token_id, text) for token_id, text in ids if token_id in special)


def plain_dialogue(messages: list[dict]) -> str:
    """A chat for an encoder-decoder model without a chat template (T5, BART): a lone user message as it is,
    as instruction-tuned T5 models take it; otherwise one "Role: text" line per message."""
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"]
    return "\n".join(f"{message['role'].capitalize()}: {message['content']}" for message in messages)
