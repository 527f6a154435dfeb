"""Tool-call parsers: model text -> content and tool calls, incrementally.

One ``ToolStream`` per choice is fed the choice's text as it is detokenized and returns
what to stream: content text and tool-call deltas shaped as OpenAI streams them (a first
delta with the call's id, type and name, then pieces of its arguments). A non-streamed
response runs the same stream over the whole text, so both carry the same calls; the
arguments are the model's own JSON text of the arguments object, unchanged.

Formats (``--tool-call-parser``, as vLLM names them):
- ``hermes``: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks; text
  before the first block is content.
- ``llama3_json``: the whole output is ``{"name": ..., "parameters": {...}}`` objects
  separated by ``;`` (optionally after ``<|python_tag|>``); anything else is content.
Plus the two forms a grammar imposes (router.tools): ``required`` (a JSON array of
``{"name", "parameters"}`` objects) and a named function (the text is its arguments).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field

_WS = " \t\r\n"


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass(slots=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text of the arguments object

    def to_dict(self) -> dict:
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}


@dataclass(slots=True)
class ToolDelta:
    """A piece of one tool call to stream; the first one of a call names it."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""

    def to_dict(self) -> dict:
        if self.name is not None:
            return {"index": self.index, "id": self.id, "type": "function",
                    "function": {"name": self.name, "arguments": self.arguments}}
        return {"index": self.index, "function": {"arguments": self.arguments}}


@dataclass(slots=True)
class ParseStep:
    content: str = ""
    tool_deltas: list[ToolDelta] = field(default_factory=list)

    def add(self, other: ParseStep) -> None:
        self.content += other.content
        self.tool_deltas += other.tool_deltas


# -- scanning one JSON object that holds a call -----------------------------------------

@dataclass(slots=True)
class _Scan:
    name: str | None = None
    args_start: int | None = None
    args_end: int | None = None
    end: int | None = None  # index just after the object's closing brace
    error: bool = False


def _skip_ws(s: str, i: int) -> int:
    while i < len(s) and s[i] in _WS:
        i += 1
    return i


def _string_end(s: str, i: int) -> int | None:
    j = i + 1
    while j < len(s):
        c = s[j]
        if c == "\\":
            j += 2
            continue
        if c == '"':
            return j + 1
        j += 1
    return None


def _value_end(s: str, i: int) -> int | None:
    """Index just after the JSON value starting at s[i]; None while it may still grow."""
    c = s[i]
    if c == '"':
        return _string_end(s, i)
    if c in "{[":
        depth = 0
        j = i
        while j < len(s):
            c = s[j]
            if c == '"':
                end = _string_end(s, j)
                if end is None:
                    return None
                j = end
                continue
            if c in "{[":
                depth += 1
            elif c in "}]":
                depth -= 1
                if depth == 0:
                    return j + 1
            j += 1
        return None
    j = i
    while j < len(s) and s[j] not in ",}]" + _WS:
        j += 1
    return j if j < len(s) else None  # a number may still have digits to come


def scan_call(s: str, args_keys: tuple[str, ...]) -> _Scan:
    """What a (possibly partial) call object ``s`` says so far."""
    out = _Scan()
    i = _skip_ws(s, 0)
    if i == len(s):
        return out
    if s[i] != "{":
        out.error = True
        return out
    i += 1
    while True:
        i = _skip_ws(s, i)
        if i == len(s):
            return out
        if s[i] == "}":
            out.end = i + 1
            return out
        if s[i] == ",":
            i += 1
            continue
        if s[i] != '"':
            out.error = True
            return out
        key_end = _string_end(s, i)
        if key_end is None:
            return out
        key = json.loads(s[i:key_end])
        i = _skip_ws(s, key_end)
        if i == len(s):
            return out
        if s[i] != ":":
            out.error = True
            return out
        i = _skip_ws(s, i + 1)
        if i == len(s):
            return out
        is_args = key in args_keys and out.args_start is None
        if is_args:
            out.args_start = i
        end = _value_end(s, i)
        if end is None:
            return out
        if key == "name" and out.name is None:
            try:
                name = json.loads(s[i:end])
            except ValueError:
                out.error = True
                return out
            if isinstance(name, str):
                out.name = name
        if is_args:
            out.args_end = end
        i = end


@dataclass(slots=True)
class _Call:
    """One call being streamed: its text so far and what of it was sent."""

    index: int
    args_keys: tuple[str, ...]
    id: str = field(default_factory=new_call_id)
    text: str = ""
    name_sent: bool = False
    args_sent: int = 0
    scan: _Scan = field(default_factory=_Scan)

    def update(self, text: str) -> list[ToolDelta]:
        self.text = text
        self.scan = scan_call(text, self.args_keys)
        out: list[ToolDelta] = []
        if self.scan.name is not None and not self.name_sent:
            self.name_sent = True
            out.append(ToolDelta(self.index, self.id, self.scan.name))
        if self.name_sent and self.scan.args_start is not None:
            stop = self.scan.args_end if self.scan.args_end is not None else len(text)
            piece = text[self.scan.args_start + self.args_sent:stop]
            if piece:
                self.args_sent += len(piece)
                if out:
                    out[-1].arguments += piece
                else:
                    out.append(ToolDelta(self.index, arguments=piece))
        return out

    def result(self) -> ToolCall | None:
        s = self.scan
        if s.error or s.end is None or s.name is None:
            return None
        args = "{}" if s.args_start is None or s.args_end is None else \
            self.text[s.args_start:s.args_end]
        return ToolCall(self.id, s.name, args)


# -- streams ------------------------------------------------------------------------------

class ToolStream:
    """Base: feed text, get ParseSteps; ``calls`` / ``content`` hold the whole result."""

    def __init__(self) -> None:
        self.calls: list[ToolCall] = []
        self.content = ""
        self.failed = False  # a call could not be parsed (non-streamed: all text is content)
        self.text = ""  # everything fed

    def feed(self, text: str) -> ParseStep:
        self.text += text
        step = self._feed(text)
        self.content += step.content
        return step

    def finish(self) -> ParseStep:
        step = self._finish()
        self.content += step.content
        return step

    def _feed(self, text: str) -> ParseStep:
        raise NotImplementedError

    def _finish(self) -> ParseStep:
        return ParseStep()

    def _close(self, call: _Call) -> None:
        done = call.result()
        if done is None:
            self.failed = True
        else:
            self.calls.append(done)


def _held_prefix(text: str, token: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``token``."""
    for n in range(min(len(token) - 1, len(text)), 0, -1):
        if token.startswith(text[-n:]):
            return n
    return 0


class HermesStream(ToolStream):
    START, END = "<tool_call>", "</tool_call>"

    def __init__(self) -> None:
        super().__init__()
        self._pending = ""
        self._call: _Call | None = None
        self._index = 0

    def _feed(self, text: str) -> ParseStep:
        self._pending += text
        step = ParseStep()
        while True:
            if self._call is None:
                at = self._pending.find(self.START)
                if at < 0:
                    keep = _held_prefix(self._pending, self.START)
                    emit = self._pending[:len(self._pending) - keep]
                    self._pending = self._pending[len(self._pending) - keep:]
                    if not self._index:  # text after the first call is not content
                        step.content += emit
                    return step
                if not self._index:
                    step.content += self._pending[:at]
                self._pending = self._pending[at + len(self.START):]
                self._call = _Call(self._index, ("arguments", "parameters"))
                self._index += 1
                continue
            at = self._pending.find(self.END)
            body = self._pending if at < 0 else self._pending[:at]
            if at < 0:
                body = body[:len(body) - _held_prefix(body, self.END)]
            step.tool_deltas += self._call.update(self._call.text + body)
            if at < 0:
                self._pending = self._pending[len(body):]
                return step
            self._pending = self._pending[at + len(self.END):]
            self._close(self._call)
            self._call = None

    def _finish(self) -> ParseStep:
        step = ParseStep()
        if self._call is not None:  # an unterminated last block counts if its JSON is whole
            step.tool_deltas += self._call.update(self._call.text + self._pending)
            self._close(self._call)
            self._call = None
        elif not self._index:
            step.content += self._pending
        self._pending = ""
        return step


class _ObjectsStream(ToolStream):
    """Calls as a run of JSON objects: optional opener, separators, optional closer."""

    opener = ""
    separators = ""
    closer = ""
    args_keys: tuple[str, ...] = ("parameters", "arguments")

    def __init__(self) -> None:
        super().__init__()
        self._buf = ""
        self._pos = 0
        self._opened = not self.opener
        self._call: _Call | None = None
        self._done = False

    def _feed(self, text: str) -> ParseStep:
        self._buf += text
        step = ParseStep()
        while not self._done:
            i = _skip_ws(self._buf, self._pos)
            if i == len(self._buf):
                return step
            if not self._opened:
                if self._buf[i] != self.opener:
                    self._fail()
                    return step
                self._opened, self._pos = True, i + 1
                continue
            if self._call is None:
                c = self._buf[i]
                if c in self.separators:
                    self._pos = i + 1
                    continue
                if self.closer and c == self.closer:
                    self._done = True
                    return step
                if c != "{":
                    self._fail()
                    return step
                self._call = _Call(len(self.calls), self.args_keys)
                self._pos = i
            step.tool_deltas += self._call.update(self._buf[self._pos:])
            if self._call.scan.error:
                self._fail()
                return step
            if self._call.scan.end is None:
                return step
            self._pos += self._call.scan.end
            self._close(self._call)
            self._call = None
        return step

    def _fail(self) -> None:
        self.failed, self._done = True, True

    def _finish(self) -> ParseStep:
        if self._call is not None:
            self._close(self._call)  # incomplete: marks the stream failed
            self._call = None
        return ParseStep()


class RequiredStream(_ObjectsStream):
    """``tool_choice: "required"``: the grammar makes the text a JSON array of calls."""

    opener, separators, closer = "[", ",", "]"
    args_keys = ("parameters",)


class Llama3JsonStream(ToolStream):
    """Llama 3's JSON tool calls: the output starts with ``{`` or ``<|python_tag|>``."""

    TAG = "<|python_tag|>"

    def __init__(self) -> None:
        super().__init__()
        self._head = ""
        self._objects: _ObjectsStream | None = None
        self._plain = False

    def _feed(self, text: str) -> ParseStep:
        if self._plain:
            return ParseStep(content=text)
        if self._objects is not None:
            return self._relay(self._objects.feed(text))
        self._head += text
        head = self._head.lstrip(_WS)
        if not head or (self.TAG.startswith(head) and head != self.TAG):
            return ParseStep()  # undecided yet
        if head.startswith((self.TAG, "{")):
            self._objects = _Llama3Objects()
            rest = head.removeprefix(self.TAG)
            return self._relay(self._objects.feed(rest))
        self._plain = True
        return ParseStep(content=self._head)

    def _relay(self, step: ParseStep) -> ParseStep:
        assert self._objects is not None
        self.calls, self.failed = self._objects.calls, self._objects.failed
        return step

    def _finish(self) -> ParseStep:
        if self._objects is not None:
            return self._relay(self._objects.finish())
        if not self._plain and self._head:  # only a prefix of the tag ever came
            return ParseStep(content=self._head)
        return ParseStep()


class _Llama3Objects(_ObjectsStream):
    separators = ";"


class NamedStream(ToolStream):
    """A named ``tool_choice``: the grammar makes the whole text the function's arguments."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self._call_id = new_call_id()
        self._name = name
        self._started = False

    def _feed(self, text: str) -> ParseStep:
        if not self._started:
            self._started = True
            return ParseStep(tool_deltas=[ToolDelta(0, self._call_id, self._name, text)])
        return ParseStep(tool_deltas=[ToolDelta(0, arguments=text)] if text else [])

    def _finish(self) -> ParseStep:
        self.calls = [ToolCall(self._call_id, self._name, self.text)]
        if not self._started:
            return ParseStep(tool_deltas=[ToolDelta(0, self._call_id, self._name, "")])
        return ParseStep()


PARSERS = {"hermes": HermesStream, "llama3_json": Llama3JsonStream}
