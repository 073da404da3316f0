"""The Jinja sandbox that model chat templates are rendered in.

It matches the environment transformers builds for ``apply_chat_template``.
Kept apart from :mod:`xybrid.chat_templates` so that jinja2 is imported only
when a model's own template is first compiled.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from datetime import datetime

import jinja2
from jinja2 import TemplateSyntaxError, nodes
from jinja2.ext import Extension
from jinja2.parser import Parser
from jinja2.sandbox import ImmutableSandboxedEnvironment

from xybrid.errors import InvalidInputError

__all__ = ["RENDER_ERRORS", "TemplateSyntaxError", "environment"]

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
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=False,
        extensions=[_GenerationBlock, "jinja2.ext.loopcontrols"],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
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
)
