"""Where the top-level values of a JSON object lie in text that may still be arriving."""

from __future__ import annotations

import json
from dataclasses import dataclass


@dataclass
class ValueSpan:
    start: int
    end: int | None = None  # None while the value is still open
    kind: str = "scalar"  # "container" ({...} or [...]), "string" or "scalar"


@dataclass
class ObjectScan:
    values: dict[str, ValueSpan]
    end: int | None  # just past the closing brace, once it has arrived


def scan_object(text: str) -> ObjectScan:
    """text starts with "{"; its top-level keys are mapped to the spans of their values so far."""
    values: dict[str, ValueSpan] = {}
    depth, in_string, escaped, string_start = 0, False, False, 0
    key: str | None = None
    awaiting_value = False
    current: ValueSpan | None = None
    for i, char in enumerate(text):
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
                if depth == 1 and current is None and not awaiting_value:
                    key = decode_string(text[string_start:i + 1])
                elif depth == 1 and current is not None and current.kind == "string":
                    current.end = i + 1
            continue
        if depth == 1 and awaiting_value and not char.isspace():
            awaiting_value = False
            current = values[key or ""] = ValueSpan(i, None, "string" if char == '"' else
                                                    "container" if char in "{[" else "scalar")
        if char == '"':
            in_string, string_start = True, i
        elif char in "{[":
            depth += 1
        elif char in "}]":
            depth -= 1
            if depth == 1 and current is not None and current.kind == "container":
                current.end = i + 1
            if depth == 0:
                close_scalar(current, text, i)
                return ObjectScan(values, i + 1)
        elif char == ":" and depth == 1:
            awaiting_value = True
        elif char == "," and depth == 1:
            close_scalar(current, text, i)
            key, current = None, None
    return ObjectScan(values, None)


def close_scalar(span: ValueSpan | None, text: str, at: int) -> None:
    if span is not None and span.end is None:
        span.end = span.start + len(text[span.start:at].rstrip())


def decode_string(json_text: str) -> str:
    try:
        value = json.loads(json_text)
    except ValueError:
        return json_text
    return value if isinstance(value, str) else json_text
