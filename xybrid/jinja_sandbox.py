"""The Jinja sandbox that model chat templates are rendered in.

It matches the environment transformers builds for ``apply_chat_template``.
Kept apart from :mod:`xybrid.chat_templates` so that jinja2 is imported only
when a model's own template is first compiled.
"""

from __future__ import annotations

import functools
import itertools
import json
import re
import sys
import threading
import types
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime
from types import FrameType
from typing import Any

import jinja2
from jinja2 import TemplateSyntaxError, nodes
from jinja2.compiler import CodeGenerator, Frame
from jinja2.ext import Extension
from jinja2.parser import Parser
from jinja2.sandbox import ImmutableSandboxedEnvironment, SandboxedEscapeFormatter, SandboxedFormatter
from jinja2.utils import Namespace
from markupsafe import Markup

from xybrid.errors import InvalidInputError

__all__ = [
    "COMPILE_ERRORS",
    "MAX_TEMPLATE_OUTPUT",
    "MAX_TEMPLATE_SOURCE",
    "MAX_TEMPLATE_STEPS",
    "MAX_TEXT_FILTER_INPUT",
    "RENDER_ERRORS",
    "TemplateSyntaxError",
    "environment",
    "render_bounded",
]

#: Most characters one render may produce, and the largest string or list a
#: template may build on the way (``"x" * n``, ``s ~ s`` in a namespace or a
#: macro argument). A prompt this long is already far past any context.
MAX_TEMPLATE_OUTPUT = 8 * 1024 * 1024

#: Most lines of the compiled template one render may execute (each loop
#: iteration is at least one). A chat template needs a few per message; a
#: nested loop that would run for hours is stopped after about a second.
MAX_TEMPLATE_STEPS = 2_000_000

#: Longest template source. Real chat templates are a few kB to 30 kB;
#: compiling takes time in proportion, outside the render's step bound.
MAX_TEMPLATE_SOURCE = 1024 * 1024

#: Longest text the filters written in Python with superlinear or slow
#: loops (``wordwrap``, ``urlize``) accept: wrapping a 1 MB word one character
#: a line copies terabytes.
MAX_TEXT_FILTER_INPUT = 64 * 1024

# Jinja compiles a template from a string under this file name.
_TEMPLATE_FILE = "<template>"


def _over_limit(what: str) -> InvalidInputError:
    return InvalidInputError(
        f"chat template stopped: {what} (a render may produce at most "
        f"{MAX_TEMPLATE_OUTPUT} characters and run {MAX_TEMPLATE_STEPS} steps)")


# Weights already measured in the current render, by id (with the object,
# so the id stays its own): templates cannot mutate lists or dicts, so a
# weight stays true, and a list shared many times is measured once.
_weights = threading.local()


_FLAT_TYPES = frozenset({str, int, float, bool, type(None)})
# Containers weighing at least this much are measured once per render.
_MEMO_MIN_WEIGHT = 64


def _weight(value: object) -> int:
    """About how many characters ``str(value)`` makes: a string's length, a
    container's items plus what they hold, counted through every reference
    (``[s] * 1000`` weighs 1000 times ``s``), capped just past the limit.

    Measuring is work too: it spends steps of the render's budget, and
    containers weighing 64 or more are measured once per render."""
    memo: dict[int, tuple[int, object]] | None = getattr(_weights, "memo", None)
    return _weigh(value, {} if memo is None else memo)


def _spend(items: int) -> None:
    """Measuring is work: it spends from the render's step budget, one step
    per container and one per 16 items in it."""
    left = getattr(_weights, "left", None)
    if left is not None:
        left -= 1 + items // 16
        _weights.left = left
        if left < 0:
            raise _over_limit(f"it ran more than {MAX_TEMPLATE_STEPS} steps")


def _weigh(value: object, memo: dict[int, tuple[int, object]]) -> int:
    if isinstance(value, (str, bytes, bytearray)):
        return len(value)
    if not isinstance(value, (list, tuple, dict)):
        return 1
    hit = memo.get(id(value))
    if hit is not None:
        return hit[0]
    total = len(value)
    _spend(total)
    items: Iterable[object] = itertools.chain(value.keys(), value.values()) \
        if isinstance(value, dict) else value
    if total >= 64 and isinstance(value, (list, tuple)) and set(map(type, value)) <= _FLAT_TYPES:
        # The common case, at C speed: a list of strings or numbers.
        total += sum(len(v) if type(v) is str else 1 for v in value)
    else:
        for item in items:
            kind = type(item)
            if kind is str:  # inline: a call per item is the cost here
                total += len(item)  # type: ignore[arg-type]
            elif kind in _FLAT_TYPES:
                total += 1
            else:
                total += _weigh(item, memo)
            if total > MAX_TEMPLATE_OUTPUT:
                break
    if total >= _MEMO_MIN_WEIGHT:
        # Kept for the rest of the render. Each entry cost at least this
        # much measuring, so the budget bounds how many there are.
        memo[id(value)] = (total, value)
    return total


def _check_size(value: object) -> object:
    if isinstance(value, (str, bytes)):  # the common case, without a call
        weight = len(value)
    elif isinstance(value, (list, tuple, dict)):
        weight = _weight(value)
    else:
        return value
    if weight > MAX_TEMPLATE_OUTPUT:
        raise _over_limit(f"it built a value of {weight} items")
    return value


def _check_result(what: str, size: int) -> None:
    """Refuse an operation whose result would hold ``size`` characters or items."""
    if size > MAX_TEMPLATE_OUTPUT:
        raise _over_limit(f"{what} would build {size} characters")


def _as_int(value: object) -> int:
    return value if isinstance(value, int) else 0


# A printf conversion: flags, width, precision (``*`` takes them from the
# arguments), length modifier, type.
_PERCENT = re.compile(r"%(?:\([^)]*\))?[#0\- +]*(\*|\d+)?(?:\.(\*|\d*))?[hlL]?(.)", re.S)


def _check_percent(fmt: str, args: object) -> None:
    """Bound ``fmt % args`` before it runs: the widths and precisions it pads
    to (``'%999999999d'``) plus the arguments it prints."""
    values = list(args) if isinstance(args, tuple) else [args]
    size, used = len(fmt), 0
    for match in _PERCENT.finditer(fmt):
        width, precision, kind = match.groups()
        if kind == "%":
            continue
        for number in (width, precision):
            if number == "*":
                size += abs(_as_int(values[used])) if used < len(values) else 0
                used += 1
            elif number:
                size += int(number) if len(number) < 12 else MAX_TEMPLATE_OUTPUT + 1
        used += 1
    _check_result("'%' formatting", size + _weight(args))


def _spec_size(spec: str) -> int:
    """The most padding a format spec asks for: every number in it (the
    width, the precision) counted, which is never less than the truth."""
    return sum(int(n) if len(n) < 12 else MAX_TEMPLATE_OUTPUT + 1 for n in re.findall(r"\d+", spec))


class _BoundedFormatter(SandboxedFormatter):
    """``str.format`` whose fields are measured before formatting, with a
    running total over the whole string."""

    def vformat(self, format_string: str, args: Any, kwargs: Any) -> str:
        self._total = len(format_string)
        return super().vformat(format_string, args, kwargs)

    def format_field(self, value: Any, format_spec: str) -> Any:
        self._total += _spec_size(format_spec) + _weight(value)
        _check_result("str.format", self._total)
        return super().format_field(value, format_spec)


class _BoundedEscapeFormatter(_BoundedFormatter, SandboxedEscapeFormatter):
    pass


def _check_str_method(method: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Bound the str and bytes methods whose result can be far larger than
    their inputs, from the arguments, before they run."""
    target = method.__self__
    name = method.__name__
    n = len(target)
    if name in ("center", "ljust", "rjust", "zfill"):
        _check_result(f"str.{name}", max(n, _as_int(args[0] if args else kwargs.get("width"))))
    elif name == "expandtabs":
        tab = _as_int(args[0] if args else kwargs.get("tabsize", 8))
        _check_result("str.expandtabs", n + target.count("\t" if isinstance(target, str) else b"\t") * max(tab, 0))
    elif name == "replace" and len(args) >= 2:
        old, new = args[0], args[1]
        if isinstance(old, type(target)) and isinstance(new, type(target)):
            times = target.count(old) if old else n + 1
            if len(args) > 2 and isinstance(args[2], int) and args[2] >= 0:
                times = min(times, args[2])
            _check_result("str.replace", n + times * max(len(new) - len(old), 0))
    elif name == "join" and args:
        items = list(args[0])
        _check_result("str.join", n * max(len(items) - 1, 0) + sum(_weight(i) for i in items))
        args = (items,)
    elif name == "translate" and args and isinstance(args[0], Mapping):
        longest = max((_weight(v) for v in args[0].values()), default=1)
        _check_result("str.translate", n * max(longest, 1))


class _BoundedCodeGenerator(CodeGenerator):
    """Compiles templates without evaluating anything at compile time, and
    with ``~`` measured.

    Jinja folds constant expressions while compiling (``{{ 'a'|center(10**9)
    }}`` or ``'%999999999d' % 1`` ran there, outside every bound of the
    render, and took gigabytes); with the optimizer off (``optimized=False``)
    this is the one place left, so only literals are treated as constants."""

    def _output_child_to_const(self, node: nodes.Expr, frame: Frame, finalize: Any) -> str:
        if not isinstance(node, (nodes.TemplateData, nodes.Const)):
            raise nodes.Impossible()
        return super()._output_child_to_const(node, frame, finalize)

    def visit_Concat(self, node: nodes.Concat, frame: Frame) -> None:
        self.write("environment.bounded_concat((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


class _BoundedNamespace(Namespace):
    """``namespace()`` whose attributes cannot hold huge values: doubling a
    string in ``ns.x`` takes 30 steps to reach a gigabyte."""

    def __setitem__(self, name: str, value: Any) -> None:
        super().__setitem__(name, _check_size(value))


# Largest integer the operators may build, in bits (a 20,000-digit number).
_MAX_INT_BITS = 64 * 1024


class _BoundedEnvironment(ImmutableSandboxedEnvironment):
    """The sandbox with bounded operators, method calls, filters, ``~`` and
    output, compiled without compile-time evaluation."""

    code_generator_class = _BoundedCodeGenerator
    # Every operator that can build a large value goes through call_binop
    # (and, being intercepted, is never folded at compile time either).
    intercepted_binops = frozenset({"+", "*", "**", "%"})

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            for seq, times in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(times, int) \
                        and _weight(seq) * times > MAX_TEMPLATE_OUTPUT:
                    raise _over_limit(f"'*' would build {_weight(seq) * times} items")
            if isinstance(left, int) and isinstance(right, int) \
                    and left.bit_length() + right.bit_length() > _MAX_INT_BITS:
                raise _over_limit(f"'*' would build a {left.bit_length() + right.bit_length()}-bit number")
        elif operator == "**" and isinstance(left, int) and isinstance(right, int) \
                and right > 0 and left.bit_length() * right > _MAX_INT_BITS:
            raise _over_limit(f"'**' would build a {left.bit_length() * right}-bit number")
        elif operator == "+" and isinstance(left, (str, list, tuple)) \
                and isinstance(right, (str, list, tuple)) \
                and _weight(left) + _weight(right) > MAX_TEMPLATE_OUTPUT:
            raise _over_limit(f"'+' would build {_weight(left) + _weight(right)} items")
        elif operator == "%" and isinstance(left, str):
            _check_percent(left, right)
        return super().call_binop(context, operator, left, right)

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        for value in (*args, *kwargs.values()):
            if isinstance(value, (list, tuple, dict)) or \
                    isinstance(value, str) and len(value) > MAX_TEMPLATE_OUTPUT:
                _check_size(value)
        if isinstance(__obj, types.BuiltinMethodType) and isinstance(__obj.__self__, (str, bytes)):
            if __obj.__name__ == "join" and args:
                args = (list(args[0]), *args[1:])  # measured, then joined: one pass
            _check_str_method(__obj, args, kwargs)
        return super().call(__context, __obj, *args, **kwargs)

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        # The sandbox's own wrapper, with a formatter that measures fields.
        if super().wrap_str_format(value) is None:
            return None
        target: str = value.__self__
        formatter: _BoundedFormatter = (
            _BoundedEscapeFormatter(self, escape=target.escape)
            if isinstance(target, Markup) else _BoundedFormatter(self))
        is_map = value.__name__ == "format_map"

        def bounded(*args: Any, **kwargs: Any) -> str:
            if is_map:
                if kwargs or len(args) != 1:
                    raise TypeError("format_map() takes exactly one argument")
                mapping = args[0]
                return type(target)(formatter.vformat(target, (), mapping))
            return type(target)(formatter.vformat(target, args, kwargs))

        return functools.update_wrapper(bounded, value)

    def compile(self, source: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(source, str) and len(source) > MAX_TEMPLATE_SOURCE:
            raise InvalidInputError(
                f"chat template source has {len(source)} characters, more than {MAX_TEMPLATE_SOURCE}")
        return super().compile(source, *args, **kwargs)

    @staticmethod
    def bounded_concat(pieces: tuple[Any, ...]) -> str:
        """``a ~ b ~ ...``, measured before it is joined."""
        _check_result("'~'", sum(_weight(p) for p in pieces))
        return "".join(map(str, pieces))


def render_bounded(template: jinja2.Template, context: Mapping[str, Any]) -> str:
    """Render with a work bound: at most :data:`MAX_TEMPLATE_STEPS` executed
    lines of the template's own code and :data:`MAX_TEMPLATE_OUTPUT`
    characters of output; past either, :class:`InvalidInputError`.

    The steps are counted by a trace function on this thread that looks only
    at frames of compiled templates (other code runs untraced), and the one
    that was set before (a debugger, coverage) is put back afterwards.
    """
    # The budget is shared with the measuring of values (_spend).
    state = _weights

    def count(frame: FrameType, event: str, arg: object) -> Any:
        if event == "line":
            state.left -= 1
            if state.left < 0:
                raise _over_limit(f"it ran more than {MAX_TEMPLATE_STEPS} steps")
        return count

    def pick(frame: FrameType, event: str, arg: object) -> Any:
        return count if frame.f_code.co_filename == _TEMPLATE_FILE else None

    previous = sys.gettrace()
    sys.settrace(pick)
    _weights.memo, _weights.left = {}, MAX_TEMPLATE_STEPS
    try:
        parts: list[str] = []
        size = 0
        for part in template.generate(context):
            size += len(part)
            if size > MAX_TEMPLATE_OUTPUT:
                raise _over_limit(f"its output passed {MAX_TEMPLATE_OUTPUT} characters")
            parts.append(part)
        return "".join(parts)
    finally:
        sys.settrace(previous)
        _weights.memo = _weights.left = None

def _raise_exception(message: object) -> None:
    """Template-callable ``raise_exception``: the template rejected its input."""
    raise InvalidInputError(str(message))


def _strftime_now(format_string: str) -> str:
    """Template-callable ``strftime_now``: local time, as transformers provides."""
    return datetime.now().strftime(format_string)


def _tojson(
    value: object,
    ensure_ascii: bool = False,
    indent: int | str | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    """``tojson`` as transformers defines it: plain ``json.dumps``, no HTML escaping.

    Jinja's built-in filter escapes ``<``, ``>``, ``&`` and ``'`` for HTML and
    sorts keys, which would change the prompt compared with training.
    """
    return json.dumps(
        value,
        ensure_ascii=ensure_ascii,
        indent=indent,
        separators=separators,
        sort_keys=sort_keys,
    )


class _GenerationBlock(Extension):
    """Accept ``{% generation %}...{% endgeneration %}`` and render its body.

    transformers marks assistant text with this tag to build training masks;
    for inference the body is simply output. Without the extension, templates
    that use it would not even parse.
    """

    tags = {"generation"}

    def parse(self, parser: Parser) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        call = self.call_method("_render_body")
        return nodes.CallBlock(call, [], [], body).set_lineno(lineno)

    def _render_body(self, caller: Callable[[], str]) -> str:
        return caller()


def _guarded(name: str, function: Callable[..., Any]) -> Callable[..., Any]:
    """A filter whose arguments are measured first: every string filter
    calls ``str()`` on its input, which for ``[s] * n`` builds n times ``s``.
    Jinja's markers (``pass_eval_context``, async variants) are kept."""

    @functools.wraps(function)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        for value in (*args, *kwargs.values()):
            if isinstance(value, (list, tuple, dict)) or \
                    isinstance(value, str) and len(value) > MAX_TEMPLATE_OUTPUT:
                _check_size(value)
        if name == "join":
            # Measured before joining, so an iterator is made a list first.
            at = next(i for i, a in enumerate(args) if not isinstance(a, _CONTEXT_TYPES))
            if not isinstance(args[at], (list, tuple)):
                args = (*args[:at], list(args[at]), *args[at + 1:])
                _check_size(args[at])
        check = _FILTER_CHECKS.get(name)
        if check is not None:
            check(*[a for a in args if not isinstance(a, _CONTEXT_TYPES)], **kwargs)
        return function(*args, **kwargs)

    return guarded


_CONTEXT_TYPES = (jinja2.Environment, jinja2.nodes.EvalContext, jinja2.runtime.Context)


def _text_len(value: object) -> int:
    return _weight(value)


def _check_center(value: Any, width: Any = 80) -> None:
    _check_result("center", max(_text_len(value), _as_int(width)))


def _check_indent(s: Any, width: Any = 4, first: bool = False, blank: bool = False) -> None:
    pad = len(width) if isinstance(width, str) else _as_int(width)
    lines = str(s).count("\n") + 1 if isinstance(s, str) else _text_len(s)
    _check_result("indent", _text_len(s) + lines * max(pad, 0))


def _check_format(value: Any, *args: Any, **kwargs: Any) -> None:
    if isinstance(value, str):
        _check_percent(value, kwargs or args)


def _check_slow_text(value: Any, *args: Any, **kwargs: Any) -> None:
    if _text_len(value) > MAX_TEXT_FILTER_INPUT:
        raise _over_limit(f"this filter takes at most {MAX_TEXT_FILTER_INPUT} characters")


def _check_wordwrap(s: Any, width: Any = 79, break_long_words: bool = True,
                    wrapstring: Any = None, break_on_hyphens: bool = True) -> None:
    _check_slow_text(s)
    lines = _text_len(s) + 1  # a line holds at least one character
    _check_result("wordwrap", _text_len(s) + lines * len(wrapstring or "\n"))


def _check_batch(value: Any, linecount: Any, fill_with: Any = None) -> None:
    _check_result("batch", _as_int(linecount))


def _check_slice(value: Any, slices: Any, fill_with: Any = None) -> None:
    _check_result("slice", _as_int(slices))


def _check_join(value: Any, d: Any = "", attribute: Any = None) -> None:
    if isinstance(value, (list, tuple)):
        _check_result("join", len(str(d)) * max(len(value) - 1, 0))


def _check_replace(s: Any, old: Any, new: Any, count: Any = None) -> None:
    if isinstance(s, str) and isinstance(old, str) and isinstance(new, str):
        _check_str_method(s.replace, (old, new) if count is None else (old, new, count), {})


def _check_tojson(value: Any, *args: Any, indent: Any = None, **kwargs: Any) -> None:
    indent = args[1] if len(args) > 1 else indent
    width = len(indent) if isinstance(indent, str) else _as_int(indent)
    # Each item is on its own line, indented by its depth (at most the weight).
    _check_result("tojson", _weight(value) * (1 + max(width, 0) * min(_weight(value), 64)))


def _check_sum(iterable: Any, attribute: Any = None, start: Any = 0) -> None:
    if isinstance(start, (str, list, tuple)) and isinstance(iterable, (list, tuple)):
        # Sequences are summed by copying: quadratic in the count.
        _check_result("sum", len(iterable) * _weight(iterable))


_FILTER_CHECKS: dict[str, Callable[..., None]] = {
    "center": _check_center,
    "indent": _check_indent,
    "format": _check_format,
    "wordwrap": _check_wordwrap,
    "urlize": _check_slow_text,
    "batch": _check_batch,
    "slice": _check_slice,
    "join": _check_join,
    "replace": _check_replace,
    "tojson": _check_tojson,
    "sum": _check_sum,
}


def _finalize(value: object) -> object:
    """Every ``{{ ... }}`` output, measured before ``str()`` runs on it
    (strings are measured by the output bound as they come)."""
    if isinstance(value, (list, tuple, dict)):
        _check_size(value)
    return value


def _lipsum(n: int = 5, html: bool = True, min: int = 20, max: int = 100) -> str:  # noqa: A002
    if not (isinstance(n, int) and isinstance(max, int) and n * max <= 100_000):
        raise _over_limit("lipsum() may make at most 100000 words")
    return jinja2.utils.generate_lorem_ipsum(n, html, min, max)


def _make_environment() -> ImmutableSandboxedEnvironment:
    # Same settings as transformers: trim_blocks and lstrip_blocks on,
    # keep_trailing_newline left at Jinja's default (False, so one trailing
    # newline of the source is dropped), loop controls ({% break %}) enabled,
    # the default (lenient) Undefined, no autoescaping.
    env = _BoundedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=False,
        extensions=[_GenerationBlock, "jinja2.ext.loopcontrols"],
        # No compile-time evaluation (see _BoundedCodeGenerator).
        optimized=False,
        finalize=_finalize,
    )
    env.filters["tojson"] = _tojson
    env.filters = {name: _guarded(name, f) for name, f in env.filters.items()}
    env.globals["lipsum"] = _lipsum
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["namespace"] = _BoundedNamespace
    return env


@functools.cache
def environment() -> ImmutableSandboxedEnvironment:
    """The shared sandbox (built on first use)."""
    return _make_environment()


# Errors a template can provoke at render time besides raise_exception():
# undefined lookups, sandbox refusals, bad operand types and so on.
RENDER_ERRORS = (
    jinja2.TemplateError,
    TypeError,
    ValueError,
    LookupError,
    AttributeError,
    ArithmeticError,
    # A template nested (or recursing through macros) past the interpreter's
    # limit, e.g. a macro that calls itself without end.
    RecursionError,
    # The last resort: an allocation no bound above foresaw.
    MemoryError,
)

# Errors compiling a template can raise besides TemplateSyntaxError: Jinja
# turns it into Python source, which Python refuses past 100 nested blocks
# (IndentationError) or which recurses past the limit while being parsed.
COMPILE_ERRORS = (SyntaxError, RecursionError, MemoryError)
