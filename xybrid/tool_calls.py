"""Tool calls and reasoning in model output: a streaming parser, grammars, prompts.

Chat models announce tool calls in several house styles. :class:`ToolCallParser`
reads a reply as it streams and splits it into events: visible text, reasoning
("thinking") text, complete tool calls with their arguments normalised to a
compact JSON string (the OpenAI wire shape), and calls it could not decode.
Markers may be split across chunks at any point; text is released as soon as
it can no longer be the start of a marker, while a tool call is released once
it is complete.

Supported formats (``format=``):

``"hermes"``
    Hermes / Qwen: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``,
    one block per call; the Qwen3-Coder body
    ``<function=NAME><parameter=KEY>VALUE</parameter></function>`` is read too.
``"llama3"``
    Llama 3.x: the whole reply is a JSON object ``{"name": ..., "parameters":
    {...}}`` (several may be separated by ``;``), optionally after
    ``<|python_tag|>``, where a built-in call like ``brave_search.call(q="x")``
    is accepted as well.
``"gemma"``
    Prompted Gemma 2/3 conventions: a fenced ``tool_code`` block holding Python
    calls ``name(key=value)``, a fenced ``json`` block holding a call object,
    or a reply that is only a call object, a JSON list of call objects, or a
    Python list of calls ``[name(key=value), ...]``.
``"gemma4"``
    Gemma 4: ``<|tool_call>call:NAME{key:<|"|>text<|"|>,n:1}<tool_call|>`` and
    reasoning in ``<|channel>thought ... <channel|>``.
``"functiongemma"``
    FunctionGemma: ``<start_function_call>call:NAME{key:<escape>text<escape>}
    <end_function_call>``.
``"auto"``
    All of the above at once.
``"none"``
    No tool calls; only reasoning is separated.

Reasoning in ``<think>...</think>`` (or ``<thinking>``) is recognised in every
format. Malformed calls are reported as :class:`MalformedToolCallEvent` and
parsing goes on; whether that ends the request is the caller's decision.
"""

from __future__ import annotations

import ast
import json
import re
import secrets
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Union

from xybrid.errors import InvalidInputError
from xybrid.grammar import _literal, _RuleSet, _SchemaConverter, validate_grammar

__all__ = [
    "TOOL_CALL_FORMATS",
    "TextEvent",
    "ThinkingEvent",
    "ToolCallEvent",
    "MalformedToolCallEvent",
    "Event",
    "ToolCallParser",
    "ParsedReply",
    "parse_tool_calls",
    "ToolSpec",
    "validate_tools",
    "tool_call_grammar",
    "tools_to_system_prompt",
]

TOOL_CALL_FORMATS: Final[tuple[str, ...]] = (
    "auto",
    "hermes",
    "llama3",
    "gemma",
    "gemma4",
    "functiongemma",
    "none",
)

# ---------------------------------------------------------------------------
# Events
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class TextEvent:
    """Visible reply text."""

    text: str


@dataclass(frozen=True)
class ThinkingEvent:
    """Reasoning text (inside think tags), kept apart from the visible reply."""

    text: str


@dataclass(frozen=True)
class ToolCallEvent:
    """A complete tool call.

    ``arguments`` is a compact JSON object string (OpenAI's wire shape);
    ``raw`` is the model's text for the call, markers included.
    """

    id: str
    name: str
    arguments: str
    raw: str

    @property
    def parsed_arguments(self) -> dict[str, Any]:
        """The arguments as a dict."""
        value = _json_loads(self.arguments)
        assert isinstance(value, dict)
        return value

    def to_openai(self) -> dict[str, Any]:
        """The call as an OpenAI ``tool_calls`` entry."""
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


@dataclass(frozen=True)
class MalformedToolCallEvent:
    """Text that announced a tool call but could not be decoded, and why."""

    raw: str
    error: str


Event = Union[TextEvent, ThinkingEvent, ToolCallEvent, MalformedToolCallEvent]


# ---------------------------------------------------------------------------
# Decoding call payloads
# ---------------------------------------------------------------------------


class _NotACall(ValueError):
    """The payload is well-formed but is not a tool call (e.g. a JSON answer)."""


_CALL_KEYS: Final[frozenset[str]] = frozenset({"name", "arguments", "parameters", "type", "id"})


def _compact(value: object) -> str:
    try:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except RecursionError:
        raise ValueError("the value nests too deeply") from None


def _call_from_object(obj: object, *, shape_only: bool) -> tuple[str, str]:
    """(name, arguments JSON) from a decoded call object.

    With ``shape_only`` the object must look exactly like a call (a name, an
    arguments/parameters key, nothing unrelated); failing that raises
    :class:`_NotACall` so that a bare JSON answer stays text.
    """
    if not isinstance(obj, dict):
        raise _NotACall("a tool call must be a JSON object")
    if isinstance(obj.get("function"), dict) and "name" not in obj:
        obj = obj["function"]  # OpenAI's nested {"type": "function", "function": {...}}
        assert isinstance(obj, dict)
    name = obj.get("name")
    if not isinstance(name, str) or not name.strip():
        raise _NotACall("the call has no 'name' string")
    if shape_only and (set(obj) - _CALL_KEYS or not {"arguments", "parameters"} & set(obj)):
        raise _NotACall("the object is not shaped like a tool call")
    args = obj.get("arguments", obj.get("parameters"))
    if args is None:
        args = {}
    if isinstance(args, str):
        text = args.strip()
        try:
            args = _json_loads(text) if text else {}
        except json.JSONDecodeError as exc:
            raise ValueError(f"the arguments string is not JSON: {exc}") from None
    if not isinstance(args, dict):
        raise ValueError(f"the arguments must be a JSON object, got {type(args).__name__}")
    try:
        return name.strip(), _compact(args)
    except ValueError as exc:
        raise ValueError(f"the arguments are not JSON: {exc}") from None


def _calls_from_json(text: str, *, shape_only: bool) -> list[tuple[str, str]]:
    """Calls from a JSON object, a JSON list of objects, or ``;``-separated objects."""
    text = text.strip()
    decoder = json.JSONDecoder()
    values: list[object] = []
    pos = 0
    while pos < len(text):
        try:
            value, end = _raw_decode(decoder, text, pos)
        except json.JSONDecodeError as exc:
            raise ValueError(f"invalid JSON: {exc}") from None
        values.append(value)
        pos = end
        while pos < len(text) and (text[pos].isspace() or text[pos] == ";"):
            pos += 1
    if not values:
        raise ValueError("empty tool call")
    objects: list[object] = []
    for value in values:
        if isinstance(value, list) and value:
            objects.extend(value)
        else:
            objects.append(value)
    return [_call_from_object(obj, shape_only=shape_only) for obj in objects]


_PY_NAMES: Final[dict[str, object]] = {
    "True": True, "False": False, "None": None, "true": True, "false": False, "null": None,
}


def _python_value(node: ast.expr) -> object:
    """A JSON-compatible value from a Python literal node (never evaluates code)."""
    if isinstance(node, ast.Constant):
        value = node.value
        if value is None or isinstance(value, (bool, int, str)):
            return value
        if isinstance(value, float) and value == value and abs(value) != float("inf"):
            return value
        raise ValueError(f"{value!r} has no JSON form")
    if isinstance(node, ast.Name) and node.id in _PY_NAMES:
        return _PY_NAMES[node.id]
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        inner = _python_value(node.operand)
        if isinstance(inner, (int, float)) and not isinstance(inner, bool):
            return -inner if isinstance(node.op, ast.USub) else inner
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_python_value(e) for e in node.elts]
    if isinstance(node, ast.Dict):
        out: dict[str, object] = {}
        for key_node, value_node in zip(node.keys, node.values):
            key = _python_value(key_node) if key_node is not None else None
            if not isinstance(key, str):
                raise ValueError("dict keys must be strings")
            out[key] = _python_value(value_node)
        return out
    raise ValueError(f"unsupported expression {ast.dump(node)[:60]}")


def _raw_decode(decoder: json.JSONDecoder, text: str, pos: int) -> tuple[Any, int]:
    try:
        return decoder.raw_decode(text, pos)
    except RecursionError:
        raise json.JSONDecodeError("JSON nests too deeply", text, pos) from None


def _json_loads(text: str) -> Any:
    """json.loads for text a model wrote: nesting past the interpreter's
    recursion limit is a JSONDecodeError like any other malformed JSON (the
    callers already treat that as "not a call"), never a RecursionError."""
    try:
        return json.loads(text)
    except RecursionError:
        raise json.JSONDecodeError("JSON nests too deeply", text, 0) from None


def _dotted_name(node: ast.expr) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted_name(node.value)}.{node.attr}"
    raise ValueError("the called object is not a name")


def _calls_from_python(text: str) -> list[tuple[str, str]]:
    """Calls written as Python: ``f(a=1)``, one per line, or ``[f(a=1), g()]``."""
    try:
        return _calls_from_python_tree(text)
    except (RecursionError, MemoryError):
        # ast and the value walk recurse per nesting level.
        raise ValueError("not a Python call: it nests too deeply") from None


def _calls_from_python_tree(text: str) -> list[tuple[str, str]]:
    try:
        tree = ast.parse(text.strip(), mode="exec")
    except SyntaxError as exc:
        raise ValueError(f"not a Python call: {exc.msg}") from None
    nodes: list[ast.expr] = []
    for stmt in tree.body:
        if not isinstance(stmt, ast.Expr):
            raise ValueError("only function calls may appear")
        if isinstance(stmt.value, (ast.List, ast.Tuple)):
            nodes.extend(stmt.value.elts)
        else:
            nodes.append(stmt.value)
    if not nodes:
        raise ValueError("no call found")
    calls = []
    for node in nodes:
        if not isinstance(node, ast.Call):
            raise ValueError("only function calls may appear")
        name = _dotted_name(node.func)
        if name.endswith(".call"):  # Llama 3 built-ins: brave_search.call(query=...)
            name = name[: -len(".call")]
        if node.args:
            raise ValueError(f"{name}() has positional arguments, which have no parameter names")
        args: dict[str, object] = {}
        for keyword in node.keywords:
            if keyword.arg is None:
                raise ValueError(f"{name}() uses **kwargs")
            args[keyword.arg] = _python_value(keyword.value)
        calls.append((name, _compact(args)))
    return calls


class _GemmaArgs:
    """Reader of the Gemma 4 / FunctionGemma argument syntax.

    Objects are ``{key:value,...}`` with bare keys, strings sit between a
    delimiter token (``<|"|>`` or ``<escape>``), other scalars are JSON
    literals.
    """

    def __init__(self, text: str, quote: str) -> None:
        self.s = text
        self.q = quote
        self.i = 0

    def ws(self) -> None:
        while self.i < len(self.s) and self.s[self.i].isspace():
            self.i += 1

    def value(self) -> object:
        self.ws()
        s = self.s
        if s.startswith(self.q, self.i):
            end = s.find(self.q, self.i + len(self.q))
            if end < 0:
                raise ValueError("unterminated string")
            text = s[self.i + len(self.q) : end]
            self.i = end + len(self.q)
            return text
        if self.i >= len(s):
            raise ValueError("unexpected end of arguments")
        if s[self.i] == "{":
            return self.obj()
        if s[self.i] == "[":
            return self.arr()
        if s[self.i] == '"':
            value, self.i = _raw_decode(json.JSONDecoder(), s, self.i)
            return value
        match = re.compile(r"[^,}\]]*").match(s, self.i)
        assert match is not None
        token = match.group().strip()
        self.i = match.end()
        if not token:
            raise ValueError("missing value")
        try:
            return _json_loads(token)
        except json.JSONDecodeError:
            return token  # an unquoted word: read it as a string

    def obj(self) -> dict[str, object]:
        self.i += 1
        out: dict[str, object] = {}
        self.ws()
        if self.s.startswith("}", self.i):
            self.i += 1
            return out
        while True:
            self.ws()
            if self.s.startswith(self.q, self.i):
                key = self.value()
            else:
                colon = self.s.find(":", self.i)
                if colon < 0:
                    raise ValueError("expected 'key:' in arguments")
                key = self.s[self.i : colon].strip().strip('"')
                self.i = colon
            self.ws()
            if not self.s.startswith(":", self.i) or not isinstance(key, str) or not key:
                raise ValueError("expected 'key:' in arguments")
            self.i += 1
            out[key] = self.value()
            self.ws()
            if self.s.startswith(",", self.i):
                self.i += 1
            elif self.s.startswith("}", self.i):
                self.i += 1
                return out
            else:
                raise ValueError("expected ',' or '}' in arguments")

    def arr(self) -> list[object]:
        self.i += 1
        out: list[object] = []
        self.ws()
        if self.s.startswith("]", self.i):
            self.i += 1
            return out
        while True:
            out.append(self.value())
            self.ws()
            if self.s.startswith(",", self.i):
                self.i += 1
            elif self.s.startswith("]", self.i):
                self.i += 1
                return out
            else:
                raise ValueError("expected ',' or ']' in a list")


def _calls_from_gemma(text: str, quote: str) -> list[tuple[str, str]]:
    body = text.strip()
    if not body.startswith("call:"):
        raise ValueError("expected 'call:NAME{...}'")
    brace = body.find("{")
    if brace < 0:
        raise ValueError("expected '{' after the tool name")
    name = body[len("call:") : brace].strip()
    if not name:
        raise ValueError("the call has no name")
    reader = _GemmaArgs(body, quote)
    reader.i = brace
    try:
        args = reader.obj()
    except RecursionError:  # one Python frame per nesting level
        raise ValueError("the arguments nest too deeply") from None
    if body[reader.i :].strip():
        raise ValueError("unexpected text after the arguments")
    return [(name, _compact(args))]


_QWEN_FUNCTION = re.compile(r"<function=([^>\s]+)>(.*?)</function>", re.S)
_QWEN_PARAMETER = re.compile(r"<parameter=([^>\s]+)>(.*?)</parameter>", re.S)


def _calls_from_hermes(text: str) -> list[tuple[str, str]]:
    body = text.strip()
    if body.startswith("<function="):
        functions = _QWEN_FUNCTION.findall(body)
        if not functions or _QWEN_FUNCTION.sub("", body).strip():
            raise ValueError("malformed <function=...> block")
        calls = []
        for name, inner in functions:
            args: dict[str, object] = {}
            for key, raw in _QWEN_PARAMETER.findall(inner):
                value = raw.strip("\n")
                try:
                    args[key] = _json_loads(value)
                except json.JSONDecodeError:
                    args[key] = value
            calls.append((name, _compact(args)))
        return calls
    try:
        return _calls_from_json(body, shape_only=False)
    except _NotACall as exc:
        raise ValueError(str(exc)) from None


# ---------------------------------------------------------------------------
# Markers
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Marker:
    opener: str
    closers: tuple[str, ...]
    kind: str


_THINK_MARKERS: Final[tuple[_Marker, ...]] = (
    _Marker("<think>", ("</think>",), "think"),
    _Marker("<thinking>", ("</thinking>",), "think"),
)
_GEMMA4_THINK: Final = _Marker("<|channel>thought", ("<channel|>",), "think")
_HERMES: Final = _Marker("<tool_call>", ("</tool_call>",), "hermes")
_GEMMA4: Final = _Marker("<|tool_call>", ("<tool_call|>",), "gemma4")
_FUNCTIONGEMMA: Final = _Marker("<start_function_call>", ("<end_function_call>",), "functiongemma")
_TOOL_CODE: Final = _Marker("```tool_code", ("```",), "tool_code")
_JSON_FENCE: Final = _Marker("```json", ("```",), "json_fence")
_PYTHON_TAG: Final = _Marker("<|python_tag|>", ("<|eom_id|>", "<|eot_id|>"), "python_tag")

# format -> (markers, whether a reply may be a bare call)
_FORMATS: Final[dict[str, tuple[tuple[_Marker, ...], bool]]] = {
    "none": (_THINK_MARKERS, False),
    "hermes": ((*_THINK_MARKERS, _HERMES), False),
    "llama3": ((*_THINK_MARKERS, _PYTHON_TAG), True),
    "gemma": ((*_THINK_MARKERS, _TOOL_CODE, _JSON_FENCE), True),
    "gemma4": ((*_THINK_MARKERS, _GEMMA4_THINK, _GEMMA4), False),
    "functiongemma": ((*_THINK_MARKERS, _FUNCTIONGEMMA), False),
    "auto": (
        (*_THINK_MARKERS, _GEMMA4_THINK, _HERMES, _GEMMA4, _FUNCTIONGEMMA, _TOOL_CODE,
         _JSON_FENCE, _PYTHON_TAG),
        True,
    ),
}

_GEMMA_QUOTES: Final[dict[str, str]] = {"gemma4": '<|"|>', "functiongemma": "<escape>"}


def _partial_suffix(text: str, markers: Iterable[str]) -> int:
    """Length of the longest end of ``text`` that could begin one of ``markers``."""
    best = 0
    markers = tuple(markers)
    longest = max((len(m) for m in markers), default=0)
    tail = text[-longest:]
    if not any(m[:1] in tail for m in markers if m):
        return 0  # the common case: no marker's first character near the end
    for marker in markers:
        for k in range(min(len(marker) - 1, len(text)), best, -1):
            if text.endswith(marker[:k]):
                best = k
                break
    return best


def _new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


_BARE_OBJECT_START = re.compile(r'\{\s*["}]')
_BARE_OBJECT_OPEN = re.compile(r"\{\s*")
_BARE_LIST_START = re.compile(r"\[\s*(\{|\]|[A-Za-z_][\w.]*\s*\()")
_BARE_LIST_OPEN = re.compile(r"\[\s*([A-Za-z_][\w.]*\s*)?")

_TEXT, _THINK, _BLOCK, _BARE = range(4)


class ToolCallParser:
    """Streaming splitter of a reply into text, thinking and tool-call events.

    ``feed(chunk)`` returns the events that became certain with that chunk;
    ``finish()`` flushes the rest (an unclosed tool call becomes a
    :class:`MalformedToolCallEvent`, unclosed thinking is flushed as thinking)
    and resets the parser for another reply.

    ``starts_in_think``: the prompt already opened a ``<think>`` block (some
    templates do), so the reply begins as reasoning. ``tool_names``: when
    given, a call to any other name is reported as malformed (a bare JSON
    reply naming an unknown tool stays text). ``id_factory`` makes call ids
    (default ``call_`` plus 24 random hex digits).
    """

    def __init__(
        self,
        format: str = "auto",
        *,
        starts_in_think: bool = False,
        tool_names: Iterable[str] | None = None,
        id_factory: Callable[[], str] | None = None,
    ) -> None:
        if not isinstance(format, str) or format not in _FORMATS:
            raise InvalidInputError(
                f"tool-call format must be one of {', '.join(TOOL_CALL_FORMATS)}, got {format!r}"
            )
        if not isinstance(starts_in_think, bool):
            raise InvalidInputError("starts_in_think must be a bool")
        self.format = format
        self._markers, self._bare = _FORMATS[format]
        self._openers = [m.opener for m in self._markers]
        self._tool_names = None if tool_names is None else frozenset(tool_names)
        self._new_id = id_factory or _new_call_id
        self._starts_in_think = starts_in_think
        self._reset()

    def _reset(self) -> None:
        self._buf = ""
        self._mode = _THINK if self._starts_in_think else _TEXT
        self._marker: _Marker | None = _THINK_MARKERS[0] if self._starts_in_think else None
        self._scan = 0  # where the closer search / bracket scan resumes
        self._at_start = True  # nothing visible but whitespace emitted yet
        self._held_ws = ""
        self._after_bare_call = False
        self._bracket_depth = 0
        self._bracket_quote = ""
        self._bracket_escape = False
        self._bare_confirmed = False
        self._emitted_calls = 0
        self._out: list[Event] = []

    # -- public API -----------------------------------------------------------

    def feed(self, chunk: str) -> list[Event]:
        """Add streamed text; return the events it completes."""
        if not isinstance(chunk, str):
            raise InvalidInputError(f"chunk must be a str, got {type(chunk).__name__}")
        self._buf += chunk
        self._run(final=False)
        return self._drain()

    def finish(self) -> list[Event]:
        """End of reply: flush everything and reset for the next reply."""
        self._run(final=True)
        if self._held_ws and not self._emitted_calls:
            self._out.append(TextEvent(self._held_ws))
        events = self._drain()
        self._reset()
        return events

    # -- machinery ------------------------------------------------------------

    def _drain(self) -> list[Event]:
        merged: list[Event] = []
        for event in self._out:
            last = merged[-1] if merged else None
            if isinstance(event, TextEvent) and isinstance(last, TextEvent):
                merged[-1] = TextEvent(last.text + event.text)
            elif isinstance(event, ThinkingEvent) and isinstance(last, ThinkingEvent):
                merged[-1] = ThinkingEvent(last.text + event.text)
            else:
                merged.append(event)
        self._out = []
        return merged

    def _run(self, final: bool) -> None:
        handlers = {_TEXT: self._step_text, _THINK: self._step_think, _BLOCK: self._step_block,
                    _BARE: self._step_bare}
        while handlers[self._mode](final):
            pass

    def _text(self, text: str) -> None:
        if not text:
            return
        if self._bare and self._at_start and not text.strip():
            self._held_ws += text
            return
        if text.strip():
            self._at_start = False
        self._out.append(TextEvent(self._held_ws + text))
        self._held_ws = ""

    def _call(self, name: str, arguments: str, raw: str, *, explicit: bool) -> bool:
        """Emit a call; False (nothing emitted) for an unknown tool in a bare reply."""
        if self._tool_names is not None and name not in self._tool_names:
            if not explicit:
                return False
            self._out.append(MalformedToolCallEvent(raw, f"unknown tool {name!r}"))
            return True
        self._out.append(ToolCallEvent(self._new_id(), name, arguments, raw))
        self._emitted_calls += 1
        return True

    def _step_text(self, final: bool) -> bool:
        if self._bare and self._at_start:
            stripped = self._buf.lstrip()
            if len(stripped) != len(self._buf):
                self._held_ws += self._buf[: len(self._buf) - len(stripped)]
                self._buf = stripped
            if not self._buf:
                return False
            if self._after_bare_call and self._buf[0] == ";":
                self._buf = self._buf[1:]
                return True
            if self._buf[0] in "{[":
                self._mode, self._scan = _BARE, 0
                self._bracket_depth, self._bracket_quote, self._bracket_escape = 0, "", False
                self._bare_confirmed = False
                return True
        buf = self._buf
        best: tuple[int, int, _Marker] | None = None
        for marker in self._markers:
            idx = buf.find(marker.opener)
            if idx >= 0 and (best is None or (idx, -len(marker.opener)) < best[:2]):
                best = (idx, -len(marker.opener), marker)
        if best is not None:
            idx, _, marker = best
            self._text(buf[:idx])
            if self._held_ws:  # whitespace before a marker is text, as in every format
                self._out.append(TextEvent(self._held_ws))
                self._held_ws = ""
            self._buf = buf[idx + len(marker.opener) :]
            self._marker, self._scan = marker, 0
            self._mode = _THINK if marker.kind == "think" else _BLOCK
            return True
        keep = 0 if final else _partial_suffix(buf, self._openers)
        self._text(buf[: len(buf) - keep])
        self._buf = buf[len(buf) - keep :]
        return False

    def _step_think(self, final: bool) -> bool:
        assert self._marker is not None
        closer = self._marker.closers[0]
        idx = self._buf.find(closer)
        if idx >= 0:
            if idx:
                self._out.append(ThinkingEvent(self._buf[:idx]))
            self._buf = self._buf[idx + len(closer) :]
            self._mode, self._marker = _TEXT, None
            return True
        keep = 0 if final else _partial_suffix(self._buf, (closer,))
        if len(self._buf) > keep:
            self._out.append(ThinkingEvent(self._buf[: len(self._buf) - keep]))
            self._buf = self._buf[len(self._buf) - keep :]
        return False

    def _step_block(self, final: bool) -> bool:
        marker = self._marker
        assert marker is not None
        buf = self._buf
        found: tuple[int, str] | None = None
        for closer in marker.closers:
            idx = buf.find(closer, self._scan)
            if idx >= 0 and (found is None or idx < found[0]):
                found = (idx, closer)
        if found is None:
            if not final:
                longest = max((len(c) for c in marker.closers), default=1)
                self._scan = max(0, len(buf) - longest + 1)
                return False
            self._buf = ""
            self._mode, self._marker = _TEXT, None
            if marker.kind == "json_fence":
                self._text(marker.opener + buf)  # an unclosed code block is just text
            elif marker.kind == "python_tag":  # the end of the reply closes it
                self._decode(marker, buf, marker.opener + buf)
            else:
                self._out.append(
                    MalformedToolCallEvent(
                        marker.opener + buf,
                        f"the reply ended inside {marker.opener} without {marker.closers[0]}",
                    )
                )
            return False
        idx, closer = found
        payload = buf[:idx]
        self._buf = buf[idx + len(closer) :]
        self._mode, self._marker = _TEXT, None
        self._decode(marker, payload, marker.opener + payload + closer)
        return True

    def _decode(self, marker: _Marker, payload: str, raw: str) -> None:
        kind = marker.kind
        try:
            if kind == "hermes":
                calls = _calls_from_hermes(payload)
            elif kind in _GEMMA_QUOTES:
                calls = _calls_from_gemma(payload, _GEMMA_QUOTES[kind])
            elif kind == "tool_code":
                try:
                    calls = _calls_from_python(payload)
                except ValueError as python_error:
                    try:
                        calls = _calls_from_json(payload, shape_only=False)
                    except ValueError:
                        raise python_error from None
            elif kind == "json_fence":
                calls = _calls_from_json(payload, shape_only=True)
            else:  # python_tag
                try:
                    calls = _calls_from_json(payload, shape_only=False)
                except ValueError as json_error:
                    if payload.lstrip().startswith(("{", "[")):
                        raise json_error from None
                    calls = _calls_from_python(payload)
        except _NotACall as exc:
            if kind == "json_fence":
                self._text(raw)
            else:
                self._out.append(MalformedToolCallEvent(raw, str(exc)))
            return
        except ValueError as exc:
            if kind == "json_fence":
                self._text(raw)
            else:
                self._out.append(MalformedToolCallEvent(raw, str(exc)))
            return
        if kind == "json_fence" and self._tool_names is not None and any(
            name not in self._tool_names for name, _ in calls
        ):
            self._text(raw)
            return
        for name, arguments in calls:
            self._call(name, arguments, raw, explicit=True)

    def _step_bare(self, final: bool) -> bool:
        buf = self._buf
        if not self._bare_confirmed:
            head = buf[:80]
            start, opening = (
                (_BARE_OBJECT_START, _BARE_OBJECT_OPEN) if buf[0] == "{"
                else (_BARE_LIST_START, _BARE_LIST_OPEN)
            )
            if start.match(head):
                self._bare_confirmed = True
            elif opening.fullmatch(head) and not final:
                return False  # cannot tell yet
            else:
                return self._bare_to_text()
        i = self._scan
        depth, quote, escape = self._bracket_depth, self._bracket_quote, self._bracket_escape
        end = -1
        while i < len(buf):
            c = buf[i]
            if quote:
                if escape:
                    escape = False
                elif c == "\\":
                    escape = True
                elif c == quote:
                    quote = ""
            elif c == '"' or (c == "'" and buf[0] == "["):
                quote = c
            elif c in "{[":
                depth += 1
            elif c in "}]":
                depth -= 1
                if depth == 0:
                    end = i + 1
                    break
            i += 1
        self._scan, self._bracket_depth = i, depth
        self._bracket_quote, self._bracket_escape = quote, escape
        if end < 0:
            if not final:
                return False
            if self.format == "llama3":
                self._buf = ""
                self._mode = _TEXT
                self._out.append(
                    MalformedToolCallEvent(buf, "the reply ended inside a JSON tool call")
                )
                return False
            return self._bare_to_text()
        value, self._buf = buf[:end], buf[end:]
        self._mode, self._scan = _TEXT, 0
        calls: list[tuple[str, str]] = []
        try:
            calls = _calls_from_json(value, shape_only=True)
        except ValueError:
            if value.startswith("["):
                try:
                    calls = _calls_from_python(value)
                except ValueError:
                    calls = []
        known = self._tool_names
        if calls and known is not None and any(name not in known for name, _ in calls):
            calls = []
        if not calls:
            self._after_bare_call = False
            self._text(value)
            self._at_start = False
            return True
        for name, arguments in calls:
            self._call(name, arguments, value, explicit=False)
        self._held_ws = ""
        self._after_bare_call = True
        return True

    def _bare_to_text(self) -> bool:
        """The bracket did not start a call: the reply is plain text from here."""
        self._mode, self._scan = _TEXT, 0
        self._at_start = False
        if self._held_ws:
            self._out.append(TextEvent(self._held_ws))
            self._held_ws = ""
        return True


# ---------------------------------------------------------------------------
# Non-streaming use
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ParsedReply:
    """A whole reply split up; ``text`` and ``thinking`` are stripped of
    surrounding whitespace."""

    text: str
    thinking: str
    tool_calls: tuple[ToolCallEvent, ...] = field(default=())
    malformed: tuple[MalformedToolCallEvent, ...] = field(default=())


def parse_tool_calls(
    text: str,
    format: str = "auto",
    *,
    starts_in_think: bool = False,
    tool_names: Iterable[str] | None = None,
    id_factory: Callable[[], str] | None = None,
) -> ParsedReply:
    """Parse a complete reply (see :class:`ToolCallParser` for the options)."""
    if not isinstance(text, str):
        raise InvalidInputError(f"text must be a str, got {type(text).__name__}")
    parser = ToolCallParser(
        format, starts_in_think=starts_in_think, tool_names=tool_names, id_factory=id_factory
    )
    events = parser.feed(text) + parser.finish()
    return ParsedReply(
        text="".join(e.text for e in events if isinstance(e, TextEvent)).strip(),
        thinking="".join(e.text for e in events if isinstance(e, ThinkingEvent)).strip(),
        tool_calls=tuple(e for e in events if isinstance(e, ToolCallEvent)),
        malformed=tuple(e for e in events if isinstance(e, MalformedToolCallEvent)),
    )


# ---------------------------------------------------------------------------
# Tool definitions
# ---------------------------------------------------------------------------

_TOOL_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,64}")


@dataclass(frozen=True)
class ToolSpec:
    """A validated function tool."""

    name: str
    description: str | None
    parameters: Mapping[str, Any] | None

    def to_openai(self) -> dict[str, Any]:
        """The OpenAI ``tools`` entry for this tool."""
        function: dict[str, Any] = {"name": self.name}
        if self.description is not None:
            function["description"] = self.description
        if self.parameters is not None:
            function["parameters"] = dict(self.parameters)
        return {"type": "function", "function": function}


def validate_tools(tools: object) -> tuple[ToolSpec, ...]:
    """Check OpenAI-style tools and return them as :class:`ToolSpec`.

    Each tool is ``{"type": "function", "function": {"name", "description"?,
    "parameters"?}}``; the flat form with the function keys beside ``type`` is
    accepted too. Names are 1-64 characters of letters, digits, ``_``, ``-``
    and ``.``, unique; ``parameters`` is a JSON schema of type object.
    """
    if isinstance(tools, (str, bytes)) or not isinstance(tools, Sequence):
        raise InvalidInputError(f"tools must be a list of tool objects, got {type(tools).__name__}")
    specs: list[ToolSpec] = []
    seen: set[str] = set()
    for index, tool in enumerate(tools):
        where = f"tools[{index}]"
        if not isinstance(tool, Mapping):
            raise InvalidInputError(f"{where} must be an object, got {type(tool).__name__}")
        if tool.get("type") != "function":
            raise InvalidInputError(f"{where}.type must be 'function', got {tool.get('type')!r}")
        function = tool.get("function", tool if "name" in tool else None)
        if not isinstance(function, Mapping):
            raise InvalidInputError(f"{where}.function must be an object with a 'name'")
        name = function.get("name")
        if not isinstance(name, str) or not _TOOL_NAME.fullmatch(name):
            raise InvalidInputError(
                f"{where}.function.name must be 1-64 letters, digits, '_', '-' or '.', got {name!r}"
            )
        if name in seen:
            raise InvalidInputError(f"{where}: tool name {name!r} is used twice")
        seen.add(name)
        description = function.get("description")
        if description is not None and not isinstance(description, str):
            raise InvalidInputError(f"{where}.function.description must be a string")
        parameters = function.get("parameters")
        if parameters is not None:
            if not isinstance(parameters, Mapping):
                raise InvalidInputError(f"{where}.function.parameters must be a JSON schema object")
            kind = parameters.get("type", "object")
            if kind != "object":
                raise InvalidInputError(
                    f"{where}.function.parameters must describe an object, got type {kind!r}"
                )
        specs.append(ToolSpec(name, description, parameters))
    return tuple(specs)


# format -> the key holding the arguments in a call object
_GRAMMAR_FORMATS: Final[dict[str, str]] = {
    "hermes": "arguments",
    "llama3": "parameters",
    "gemma": "arguments",
}


def tool_call_grammar(
    tools: object, format: str = "hermes", *, parallel: bool = True, strict: bool = True
) -> str:
    """A GBNF grammar whose sentences are tool calls in ``format``.

    Each call names one of ``tools`` and its arguments are an instance of that
    tool's ``parameters`` schema (converted by
    :func:`xybrid.grammar.json_schema_to_gbnf` rules; ``strict=False`` skips
    schema keywords a grammar cannot enforce). With ``parallel`` one or more
    calls are allowed, otherwise exactly one. Formats:

    - ``"hermes"``: ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``
      blocks separated by a newline;
    - ``"llama3"``: ``{"name": ..., "parameters": {...}}`` objects separated
      by ``;``;
    - ``"gemma"``: one ``{"name": ..., "arguments": {...}}`` object, or a JSON
      list of them when ``parallel``.

    Every sentence parses with :class:`ToolCallParser` in the same format.
    """
    if format not in _GRAMMAR_FORMATS:
        raise InvalidInputError(
            f"tool_call_grammar supports formats {', '.join(_GRAMMAR_FORMATS)}, got {format!r}"
        )
    specs = validate_tools(tools)
    if not specs:
        raise InvalidInputError("tool_call_grammar needs at least one tool")
    args_key = _literal(json.dumps(_GRAMMAR_FORMATS[format]))
    rules = _RuleSet()
    ws = rules.primitive("ws")
    calls = []
    for index, spec in enumerate(specs):
        parameters: Mapping[str, Any]
        if spec.parameters is None:  # a function without arguments
            parameters = {"type": "object", "properties": {}, "additionalProperties": False}
        else:
            parameters = {**spec.parameters, "type": "object"}
        converter = _SchemaConverter(rules, parameters, strict=strict, prefix=f"tool{index}-")
        args = converter.convert(parameters, f"tool{index}-args")
        name = _literal(json.dumps(spec.name, ensure_ascii=False))
        obj = " ".join(
            ['"{"', ws, '"\\"name\\""', ws, '":"', ws, name, '","', ws, args_key, ws, '":"', ws,
             args, ws, '"}"']
        )
        calls.append(rules.add(f"tool{index}-call", obj))
    call = rules.add("call", " | ".join(calls))
    if format == "hermes":
        block = rules.add("tool-call-block", f'"<tool_call>" "\\n"? {call} "\\n"? "</tool_call>"')
        root = f'{block} ( "\\n" {block} )*' if parallel else block
    elif format == "llama3":
        root = f'{call} ( ";" {ws} {call} )*' if parallel else call
    else:
        root = f'{call} | "[" {ws} {call} ( "," {ws} {call} )* {ws} "]"' if parallel else call
    rules.add("root", root)
    return validate_grammar(rules.render())


def tools_to_system_prompt(tools: object, format: str = "hermes") -> str:
    """System-prompt text that teaches a model the tools and the call format.

    For chat templates that cannot render tools themselves; the described
    format matches :class:`ToolCallParser` and :func:`tool_call_grammar`.
    """
    if format not in _GRAMMAR_FORMATS:
        raise InvalidInputError(
            f"tools_to_system_prompt supports formats {', '.join(_GRAMMAR_FORMATS)}, got {format!r}"
        )
    specs = validate_tools(tools)
    if not specs:
        raise InvalidInputError("tools_to_system_prompt needs at least one tool")
    listing = "\n".join(json.dumps(spec.to_openai(), ensure_ascii=False) for spec in specs)
    intro = (
        "You have access to the tools below, described as JSON schemas. Use one only when it "
        "helps to answer; otherwise reply normally.\n\n<tools>\n" + listing + "\n</tools>\n\n"
    )
    if format == "hermes":
        how = (
            "To use a tool, write a JSON object with its name and arguments between "
            "<tool_call> and </tool_call>:\n"
            '<tool_call>\n{"name": "TOOL_NAME", "arguments": {"ARGUMENT": "VALUE"}}\n</tool_call>\n'
            "For several tools, write one such block per call."
        )
    elif format == "llama3":
        how = (
            "To use a tool, reply with nothing but a JSON object of this form:\n"
            '{"name": "TOOL_NAME", "parameters": {"ARGUMENT": "VALUE"}}\n'
            "For several tools, separate the objects with a semicolon."
        )
    else:
        how = (
            "To use a tool, reply with nothing but a JSON object of this form:\n"
            '{"name": "TOOL_NAME", "arguments": {"ARGUMENT": "VALUE"}}\n'
            "For several tools, reply with a JSON list of such objects."
        )
    return intro + how
