"""The Jinja sandbox that model chat templates are rendered in.

It matches the environment transformers builds for ``apply_chat_template``.
Kept apart from :mod:`xybrid.chat_templates` so that jinja2 is imported only
when a model's own template is first compiled.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable, Mapping
from datetime import datetime
from types import FrameType
from typing import Any

import jinja2
from jinja2 import TemplateSyntaxError, nodes
from jinja2.ext import Extension
from jinja2.parser import Parser
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace

from xybrid.errors import InvalidInputError

__all__ = [
    "COMPILE_ERRORS",
    "MAX_TEMPLATE_OUTPUT",
    "MAX_TEMPLATE_STEPS",
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

# Jinja compiles a template from a string under this file name.
_TEMPLATE_FILE = "<template>"


def _over_limit(what: str) -> InvalidInputError:
    return InvalidInputError(
        f"chat template stopped: {what} (a render may produce at most "
        f"{MAX_TEMPLATE_OUTPUT} characters and run {MAX_TEMPLATE_STEPS} steps)")


def _check_size(value: object) -> object:
    if isinstance(value, (str, list, tuple, dict)) and len(value) > MAX_TEMPLATE_OUTPUT:
        raise _over_limit(f"it built a value of {len(value)} items")
    return value


class _BoundedNamespace(Namespace):
    """``namespace()`` whose attributes cannot hold huge values: doubling a
    string in ``ns.x`` takes 30 steps to reach a gigabyte."""

    def __setitem__(self, name: str, value: Any) -> None:
        super().__setitem__(name, _check_size(value))


class _BoundedEnvironment(ImmutableSandboxedEnvironment):
    """The sandbox with bounded operators and call arguments."""

    intercepted_binops = frozenset({"+", "*", "**"})

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            for seq, times in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(times, int) \
                        and len(seq) * times > MAX_TEMPLATE_OUTPUT:
                    raise _over_limit(f"'*' would build {len(seq) * times} items")
        elif operator == "**" and isinstance(left, int) and isinstance(right, int) \
                and right > 0 and left.bit_length() * right > 64 * 1024:
            raise _over_limit(f"'**' would build a {left.bit_length() * right}-bit number")
        elif operator == "+" and isinstance(left, (str, list, tuple)) \
                and isinstance(right, (str, list, tuple)) \
                and len(left) + len(right) > MAX_TEMPLATE_OUTPUT:
            raise _over_limit(f"'+' would build {len(left) + len(right)} items")
        return super().call_binop(context, operator, left, right)

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        for value in (*args, *kwargs.values()):
            _check_size(value)
        return super().call(__context, __obj, *args, **kwargs)


def render_bounded(template: jinja2.Template, context: Mapping[str, Any]) -> str:
    """Render with a work bound: at most :data:`MAX_TEMPLATE_STEPS` executed
    lines of the template's own code and :data:`MAX_TEMPLATE_OUTPUT`
    characters of output; past either, :class:`InvalidInputError`.

    The steps are counted by a trace function on this thread that looks only
    at frames of compiled templates (other code runs untraced), and the one
    that was set before (a debugger, coverage) is put back afterwards.
    """
    left = MAX_TEMPLATE_STEPS

    def count(frame: FrameType, event: str, arg: object) -> Any:
        nonlocal left
        if event == "line":
            left -= 1
            if left < 0:
                raise _over_limit(f"it ran more than {MAX_TEMPLATE_STEPS} steps")
        return count

    def pick(frame: FrameType, event: str, arg: object) -> Any:
        return count if frame.f_code.co_filename == _TEMPLATE_FILE else None

    previous = sys.gettrace()
    sys.settrace(pick)
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
    )
    env.filters["tojson"] = _tojson
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
)

# Errors compiling a template can raise besides TemplateSyntaxError: Jinja
# turns it into Python source, which Python refuses past 100 nested blocks
# (IndentationError) or which recurses past the limit while being parsed.
COMPILE_ERRORS = (SyntaxError, RecursionError, MemoryError)
