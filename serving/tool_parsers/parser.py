"""A reply's text, delta by delta, split into content and tool calls: content streams until a call
opens; each call streams its id and name as soon as its name is known, then its arguments as they
arrive. A reply read whole goes through the same steps, so streamed and whole replies agree."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field

from batching.detokenizer import partial_suffix_length
from serving.tool_parsers.formats import ToolFormat
from serving.tool_parsers.json_scan import ObjectScan, decode_string, scan_object


@dataclass
class CallStarted:
    index: int
    id: str
    name: str


@dataclass
class ArgumentsAdded:
    index: int
    text: str


Event = str | CallStarted | ArgumentsAdded  # a str is content


@dataclass
class ParsedCall:
    start: int  # where its object opens in the calls' text
    scan: ObjectScan | None = None
    index: int | None = None  # set once started (its name is one of the tools)
    name: str = ""
    arguments_sent: int = 0  # characters of the raw arguments already sent
    arguments: list[str] = field(default_factory=list)

    @property
    def valid(self) -> bool:
        try:
            return isinstance(json.loads("".join(self.arguments)), dict)
        except ValueError:
            return False


class ToolCallParser:
    def __init__(self, fmt: ToolFormat, tool_names: set[str], parallel: bool = True) -> None:
        self.format = fmt
        self.tool_names = tool_names
        self.parallel = parallel
        self.text = ""  # everything fed
        self.held = ""  # content that may be the start of a marker
        self.calls_text: str | None = None  # the reply from the first marker on
        self.calls: list[ParsedCall] = []
        self.content_sent = False

    def feed(self, text: str) -> list[Event]:
        self.text += text
        if self.calls_text is None:
            return self._content(text)
        return self._feed_calls(text)

    def finish(self) -> list[Event]:
        """The held tail; a calls region that named no known tool turns out to be content after all."""
        events = self._emit_content(self.held)
        self.held = ""
        if self.calls_text is not None and not self.started:
            events.append(self.calls_text)
        return events

    @property
    def started(self) -> list[ParsedCall]:
        return [call for call in self.calls if call.index is not None]

    def _content(self, text: str) -> list[Event]:
        buffer = self.held + text
        cuts = [i for i in (buffer.find(marker) for marker in self.format.markers) if i >= 0]
        stripped = buffer.lstrip()
        if not self.content_sent and any(stripped.startswith(lead) for lead in self.format.leading):
            cuts.append(len(buffer) - len(stripped))
        if cuts:
            cut = min(cuts)
            self.held, self.calls_text = "", ""
            return self._emit_content(buffer[:cut]) + self._feed_calls(buffer[cut:])
        if not self.content_sent and not stripped:  # whitespace before a call is not content
            self.held = buffer
            return []
        keep = partial_suffix_length(buffer, self.format.markers)
        self.held = buffer[len(buffer) - keep:]
        return self._emit_content(buffer[:len(buffer) - keep])

    def _feed_calls(self, text: str) -> list[Event]:
        self.calls_text += text
        return self._scan_calls()

    def _emit_content(self, text: str) -> list[Event]:
        if not text or (not self.content_sent and not text.strip()):
            return []
        self.content_sent = True
        return [text]

    def _scan_calls(self) -> list[Event]:
        events: list[Event] = []
        while True:
            call = self.calls[-1] if self.calls and self.calls[-1].scan.end is None else None
            if call is None:
                after = self.calls[-1].start + self.calls[-1].scan.end if self.calls else 0
                opening = self.calls_text.find("{", after)
                if opening < 0 or (self.started and not self.parallel):
                    return events
                call = ParsedCall(opening)
                self.calls.append(call)
            call.scan = scan_object(self.calls_text[call.start:])
            events += self._advance(call)
            if call.scan.end is None:
                return events

    def _advance(self, call: ParsedCall) -> list[Event]:
        text = self.calls_text[call.start:]
        values = call.scan.values
        events: list[Event] = []
        if call.index is None:
            name = values.get("name")
            if name is None or name.end is None:
                return events
            call.name = decode_string(text[name.start:name.end])
            if call.name not in self.tool_names:
                return events
            call.index = len(self.started)
            events.append(CallStarted(call.index, f"call_{uuid.uuid4().hex[:24]}", call.name))
        arguments = values.get(self.format.arguments_key) or values.get("arguments")
        fragment = ""
        if arguments is None:
            fragment = "{}" if call.scan.end is not None else ""
        elif arguments.kind == "container":
            fragment = text[arguments.start + call.arguments_sent:arguments.end or len(text)]
        elif arguments.end is not None and not call.arguments_sent:  # arguments sent as a JSON string
            fragment = decode_string(text[arguments.start:arguments.end])
        if fragment:
            call.arguments_sent += len(fragment)
            call.arguments.append(fragment)
            events.append(ArgumentsAdded(call.index, fragment))
        return events

