"""How each chat-template family lays out tool calls: the text that opens them, the key that holds the
arguments, and the grammar that forces a call in that same layout (tool_choice required or named)."""

from __future__ import annotations

import json
from dataclasses import dataclass

from serving.grammars import JSON_LAYOUT


@dataclass(frozen=True)
class ToolFormat:
    name: str
    template_marks: tuple[str, ...]  # text in a chat template that tells this family apart
    markers: tuple[str, ...]  # text that opens the calls anywhere in a reply
    leading: tuple[str, ...] = ()  # text that opens the calls only at the very start of a reply
    arguments_key: str = "arguments"
    opening: str = ""  # forced calls: before the first call, between calls, around each, after the last
    separator: str = "\n"
    call_prefix: str = ""
    call_suffix: str = ""
    closing: str = ""

    def forced_grammar(self, tools: list[dict], parallel: bool) -> str:
        """A Lark grammar (llguidance's dialect) for one call, or several when parallel, of these tools."""
        call_schema = {"anyOf": [{
            "type": "object",
            "properties": {"name": {"const": tool["name"]},
                           self.arguments_key: tool.get("parameters") or {"type": "object"}},
            "required": ["name", self.arguments_key],
            "additionalProperties": False,
        } for tool in tools], "x-guidance": JSON_LAYOUT}
        calls = f"call ({lark_text(self.separator)} call)*" if parallel else "call"
        return "\n".join([
            f"start: {lark_text(self.opening)} {calls} {lark_text(self.closing)}",
            f"call: {lark_text(self.call_prefix)} call_json {lark_text(self.call_suffix)}",
            f"call_json: %json {json.dumps(call_schema)}",
        ])

    def call_text(self, name: str, arguments: dict | str) -> str:
        """One call as this family writes it (for dialogues sent back to a template that ignores tools)."""
        return self.call_prefix + json.dumps({"name": name, self.arguments_key: arguments}) + self.call_suffix


def lark_text(text: str) -> str:
    return json.dumps(text) if text else ""


HERMES = ToolFormat("hermes", template_marks=("<tool_call>",), markers=("<tool_call>",),
                    call_prefix="<tool_call>\n", call_suffix="\n</tool_call>")
LLAMA3_JSON = ToolFormat("llama3_json", template_marks=("<|python_tag|>", "Environment: ipython"),
                         markers=("<|python_tag|>",), leading=("{",), arguments_key="parameters", separator="; ")
MISTRAL = ToolFormat("mistral", template_marks=("[TOOL_CALLS]",), markers=("[TOOL_CALLS]",),
                     opening="[TOOL_CALLS][", separator=", ", closing="]")
FORMATS = {f.name: f for f in (HERMES, LLAMA3_JSON, MISTRAL)}


def detect_format(chat_template: str | None, choice: str = "auto") -> ToolFormat:
    """The --tool-call-parser choice, or the family the chat template belongs to (Hermes when it shows none)."""
    if choice != "auto":
        return FORMATS[choice]
    for fmt in FORMATS.values():
        if chat_template and any(mark in chat_template for mark in fmt.template_marks):
            return fmt
    return HERMES


def tools_system_prompt(tools: list[dict], fmt: ToolFormat) -> str:
    """Tools described in a system prompt, for templates that do not render tools themselves."""
    listing = "\n".join(json.dumps({"type": "function", "function": tool}) for tool in tools)
    example = fmt.opening + fmt.call_text("<function-name>", {"<argument>": "<value>"}) + fmt.closing
    return ("You may call one or more functions to help with the user's request. The functions are described "
            f"within <tools></tools> tags:\n<tools>\n{listing}\n</tools>\n"
            f"To call a function, reply with a JSON object naming it and giving its arguments, like this:\n{example}")
