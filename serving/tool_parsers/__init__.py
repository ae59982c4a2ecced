"""Tool calls in a model's reply, per chat-template family (Hermes/Qwen, Llama 3 JSON, Mistral)."""

from serving.tool_parsers.formats import FORMATS, ToolFormat, detect_format, tools_system_prompt
from serving.tool_parsers.parser import ArgumentsAdded, CallStarted, Event, ToolCallParser

__all__ = ["FORMATS", "ArgumentsAdded", "CallStarted", "Event", "ToolCallParser", "ToolFormat", "detect_format",
           "tools_system_prompt"]
