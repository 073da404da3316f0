"""GBNF grammars for constrained output: pre-checks and a JSON-schema converter.

llama.cpp constrains sampling with a GBNF grammar. This module prepares those
grammars on the Python side:

- :func:`validate_grammar` runs cheap checks before a grammar reaches the native
  sampler: a size bound and an alternation bound (a huge or wildly branching
  grammar makes every sampled token expensive), then a syntax scan that follows
  llama.cpp's own parser so a typo is reported with its line and column instead
  of a bare "failed to parse".
- :func:`json_schema_to_gbnf` turns a JSON schema into a grammar whose every
  sentence is an instance of the schema (see its docstring for what is and is
  not enforced).
- :data:`JSON_OBJECT_GBNF`, :func:`json_value_grammar` and
  :func:`response_format_to_grammar` cover the OpenAI ``response_format``
  modes.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal, InvalidOperation
from typing import Any, Final
from urllib.parse import unquote

from xybrid.errors import GrammarError, InvalidInputError

__all__ = [
    "MAX_GRAMMAR_BYTES",
    "MAX_GRAMMAR_ALTERNATIONS",
    "MAX_GRAMMAR_DEPTH",
    "MAX_GRAMMAR_STACKS",
    "JSON_OBJECT_GBNF",
    "validate_grammar",
    "json_schema_to_gbnf",
    "json_value_grammar",
    "response_format_to_grammar",
]

#: Largest grammar source, in UTF-8 bytes, forwarded to llama.cpp. Real
#: grammars are a few KiB; anything past this is refused as abusive.
MAX_GRAMMAR_BYTES: Final[int] = 64 * 1024

#: Most ``|`` characters a grammar may contain. Every ``|`` in the source is
#: counted, including those inside literals, character classes and comments:
#: the count is a cheap bound on branching, not a parse.
MAX_GRAMMAR_ALTERNATIONS: Final[int] = 4096

#: Most parse stacks a grammar may hold while it is enforced. llama.cpp keeps
#: one stack per way the text so far can continue (``"a1" | "a2" | ...``
#: starts with one per alternative; an ambiguous grammar multiplies them as
#: text arrives), and each sampled token is matched against every one. Checked
#: when the sampler is built (a :class:`GrammarError` then) and after every
#: accepted character (the request ends with a :class:`GrammarError`).
MAX_GRAMMAR_STACKS: Final[int] = 1024

#: Deepest nesting of subschemas a JSON schema may have to be converted.
MAX_SCHEMA_DEPTH: Final[int] = 64

#: Deepest nesting of parenthesised groups. llama.cpp's parser recurses once
#: per level on the C stack; real grammars nest a handful of levels.
MAX_GRAMMAR_DEPTH: Final[int] = 128

_SURROGATE = re.compile("[\ud800-\udfff]")
_MAX_CODE_POINT = 0x10FFFF

# llama.cpp refuses repetition counts above this (MAX_REPETITION_THRESHOLD).
_LLAMA_MAX_REPETITION: Final[int] = 2000


# ---------------------------------------------------------------------------
# validate_grammar
# ---------------------------------------------------------------------------


def validate_grammar(gbnf: str, *, n_vocab: int | None = None, root: str = "root") -> str:
    """Check a GBNF grammar before it is handed to llama.cpp; return it unchanged.

    Raises :class:`GrammarError` naming the problem when the grammar is larger
    than :data:`MAX_GRAMMAR_BYTES`, has more than
    :data:`MAX_GRAMMAR_ALTERNATIONS` ``|`` characters, is empty, holds a NUL
    or a lone surrogate, nests groups deeper than :data:`MAX_GRAMMAR_DEPTH`,
    is not valid GBNF syntax (unterminated literal or character class,
    unbalanced parentheses, a bad escape or repetition), uses a rule it never
    defines, or defines no ``root`` rule (``root`` names the start rule).

    It then proves that the grammar can produce output, since llama.cpp
    accepts grammars that cannot (and used to abort on the first token):

    - every character range is non-empty, every code point is a character
      (at most U+10FFFF, not a surrogate, not NUL) and every character class
      matches at least one character;
    - with ``n_vocab``, every token id ``<[N]>`` is below it;
    - no rule is left-recursive, also through rules or groups that can match
      the empty string (``a ::= b? a "x"``);
    - every rule reachable from the start rule can finish (derive a finite
      string): ``root ::= "a" root`` is refused.

    Each refusal names the rule it is about.
    """
    if not isinstance(gbnf, str):
        raise GrammarError(f"grammar must be a str of GBNF text, got {type(gbnf).__name__}")
    size = len(gbnf.encode("utf-8", errors="surrogatepass"))
    if size > MAX_GRAMMAR_BYTES:
        raise GrammarError(
            f"grammar is {size} bytes, over the limit of {MAX_GRAMMAR_BYTES} bytes"
        )
    alternations = gbnf.count("|")
    if alternations > MAX_GRAMMAR_ALTERNATIONS:
        raise GrammarError(
            f"grammar has {alternations} '|' alternation operators, over the limit of "
            f"{MAX_GRAMMAR_ALTERNATIONS}"
        )
    if not gbnf.strip():
        raise GrammarError("grammar is empty")
    if "\x00" in gbnf:
        # llama.cpp reads a C string: everything after the NUL would vanish.
        raise GrammarError(
            f"grammar contains a NUL character at index {gbnf.index(chr(0))} "
            "(write \\x00 to mean code point 0)")
    surrogate = _SURROGATE.search(gbnf)
    if surrogate is not None:
        raise GrammarError(
            f"grammar contains a lone surrogate U+{ord(surrogate.group()):04X} at index "
            f"{surrogate.start()}; it is not a character")
    if not isinstance(root, str) or not root:
        raise GrammarError(f"the start rule name must be a non-empty str, got {root!r}")
    checker = _GbnfChecker(gbnf, root)
    checker.check()
    _GbnfAnalysis(checker.rules, root, n_vocab).check()
    return gbnf


def _is_word_char(c: str) -> bool:
    # llama.cpp rule names: ASCII letters, digits and '-' (no underscore).
    return ("a" <= c <= "z") or ("A" <= c <= "Z") or ("0" <= c <= "9") or c == "-"


class _GbnfChecker:
    """A syntax-only walk over GBNF that mirrors llama.cpp's recursive descent.

    It accepts exactly what llama.cpp's parser accepts (so it never refuses a
    grammar the native side would take) and records rule definitions and
    references for the root / undefined-rule checks.
    """

    def __init__(self, src: str, root: str = "root") -> None:
        self.src = src
        self.n = len(src)
        self.root = root
        self.defined: set[str] = set()
        self.references: dict[str, int] = {}
        # name -> alternatives (several definitions of a name add alternatives,
        # as in llama.cpp); each alternative is a list of _Item.
        self.rules: dict[str, list[list[_Item]]] = {}
        self.depth = 0

    # -- diagnostics --------------------------------------------------------

    def error(self, pos: int, message: str) -> GrammarError:
        line = self.src.count("\n", 0, pos) + 1
        column = pos - (self.src.rfind("\n", 0, pos) + 1) + 1
        return GrammarError(f"grammar line {line}, column {column}: {message}")

    def at(self, pos: int) -> str:
        return self.src[pos] if pos < self.n else ""

    # -- lexical helpers ----------------------------------------------------

    def space(self, pos: int, newline_ok: bool) -> int:
        src, n = self.src, self.n
        while pos < n:
            c = src[pos]
            if c == "#":
                while pos < n and src[pos] not in "\r\n":
                    pos += 1
            elif c in " \t" or (newline_ok and c in "\r\n"):
                pos += 1
            else:
                break
        return pos

    def name_end(self, pos: int) -> int:
        end = pos
        while end < self.n and _is_word_char(self.src[end]):
            end += 1
        if end == pos:
            found = self.at(pos)
            raise self.error(
                pos,
                f"expected a rule name, found {found!r}"
                + (" (rule names may use only letters, digits and '-')" if found == "_" else ""),
            )
        return end

    def int_end(self, pos: int) -> int:
        end = pos
        while end < self.n and self.src[end].isascii() and self.src[end].isdigit():
            end += 1
        if end == pos:
            raise self.error(pos, f"expected an integer, found {self.at(pos)!r}")
        return end

    def char(self, pos: int) -> int:
        """Skip one (possibly escaped) character of a literal or class."""
        return self.char_value(pos)[0]

    def char_value(self, pos: int) -> tuple[int, int]:
        """One (possibly escaped) character of a literal or class: the
        position after it and its code point."""
        if self.at(pos) != "\\":
            return pos + 1, ord(self.src[pos])
        kind = self.at(pos + 1)
        hex_digits = {"x": 2, "u": 4, "U": 8}.get(kind)
        if hex_digits is not None:
            digits = self.src[pos + 2 : pos + 2 + hex_digits]
            if len(digits) != hex_digits or any(c not in "0123456789abcdefABCDEF" for c in digits):
                raise self.error(pos, f"escape \\{kind} needs {hex_digits} hex digits")
            return pos + 2 + hex_digits, int(digits, 16)
        simple = {"t": 9, "r": 13, "n": 10, "\\": 92, '"': 34, "[": 91, "]": 93, "-": 45}
        if kind and kind in simple:
            return pos + 2, simple[kind]
        raise self.error(pos, f"unknown escape '\\{kind}'")

    # -- grammar structure --------------------------------------------------

    def check(self) -> None:
        pos = self.space(0, True)
        while pos < self.n:
            pos = self.rule(pos)
        if self.root not in self.defined:
            raise GrammarError(
                f"grammar defines no {self.root!r} rule (generation starts at {self.root!r})")
        for name, where in self.references.items():
            if name not in self.defined:
                raise self.error(where, f"rule {name!r} is used but never defined")

    def rule(self, pos: int) -> int:
        end = self.name_end(pos)
        name = self.src[pos:end]
        pos = self.space(end, False)
        if not self.src.startswith("::=", pos):
            raise self.error(pos, f"expected '::=' after rule name {name!r}")
        self.defined.add(name)
        alts: list[list[_Item]] = []
        pos = self.alternates(self.space(pos + 3, True), nested=False, out=alts, rule=name)
        self.rules.setdefault(name, []).extend(alts)
        c = self.at(pos)
        if c == "\r":
            pos += 2 if self.at(pos + 1) == "\n" else 1
        elif c == "\n":
            pos += 1
        elif c == ")":
            raise self.error(pos, "unbalanced ')' with no matching '('")
        elif c == "]":
            raise self.error(pos, "unbalanced ']' with no matching '['")
        elif c == "_":
            raise self.error(pos, "rule names may use only letters, digits and '-', not '_'")
        elif c:
            raise self.error(pos, f"unexpected {c!r} in the body of rule {name!r}")
        return self.space(pos, True)

    def alternates(self, pos: int, nested: bool, out: list[list[_Item]], rule: str) -> int:
        items: list[_Item] = []
        pos = self.sequence(pos, nested, items, rule)
        out.append(items)
        while self.at(pos) == "|":
            items = []
            pos = self.sequence(self.space(pos + 1, True), nested, items, rule)
            out.append(items)
        return pos

    def sequence(self, pos: int, nested: bool, items: list[_Item], rule: str) -> int:
        has_item = False
        while pos < self.n:
            c = self.src[pos]
            start = pos
            if c == '"':
                pos += 1
                chars: list[int] = []
                while self.at(pos) != '"':
                    if pos >= self.n:
                        raise self.error(start, "unterminated string literal")
                    pos, cp = self.char_value(pos)
                    chars.append(cp)
                bad = next((cp for cp in chars if not _is_character(cp)), None)
                if bad is not None:
                    raise self.error(start, f"the literal in rule {rule!r} holds "
                                            f"{_describe_code_point(bad)}, which no text can contain")
                literal = _Item("literal", start)
                if not chars:
                    literal.optional()  # "" matches the empty string
                items.append(literal)
                pos = self.space(pos + 1, nested)
            elif c == "[":
                pos += 1
                negated = self.at(pos) == "^"
                if negated:
                    pos += 1
                ranges: list[tuple[int, int]] = []
                while self.at(pos) != "]":
                    if pos >= self.n:
                        raise self.error(start, "unterminated character class '['")
                    here = pos
                    pos, lo = self.char_value(pos)
                    hi = lo
                    if self.at(pos) == "-" and self.at(pos + 1) != "]":
                        if pos + 1 >= self.n:
                            raise self.error(start, "unterminated character class '['")
                        pos, hi = self.char_value(pos + 1)
                    if hi < lo:
                        raise self.error(here, f"the character range in rule {rule!r} is empty "
                                               f"(U+{lo:04X} is after U+{hi:04X})")
                    for cp in (lo, hi):
                        if cp > _MAX_CODE_POINT:
                            raise self.error(here, f"the character class in rule {rule!r} holds "
                                                   f"{_describe_code_point(cp)}")
                    ranges.append((lo, hi))
                if not _class_matches_something(ranges, negated):
                    raise self.error(start, f"the character class in rule {rule!r} matches no "
                                            "character")
                items.append(_Item("class", start))
                pos = self.space(pos + 1, nested)
            elif c in "<!":
                items.append(_Item("token", start, token=self.token_id(pos)))
                pos = self.token(pos)
                pos = self.space(pos, nested)
            elif _is_word_char(c):
                end = self.name_end(pos)
                name = self.src[pos:end]
                self.references.setdefault(name, pos)
                items.append(_Item("ref", start, ref=name))
                pos = self.space(end, nested)
            elif c == "(":
                self.depth += 1
                if self.depth > MAX_GRAMMAR_DEPTH:
                    raise self.error(start, f"groups in rule {rule!r} nest deeper than "
                                            f"{MAX_GRAMMAR_DEPTH} levels")
                group: list[list[_Item]] = []
                pos = self.alternates(self.space(pos + 1, True), nested=True, out=group, rule=rule)
                self.depth -= 1
                if self.at(pos) != ")":
                    raise self.error(start, "unclosed '(' (no matching ')')")
                items.append(_Item("group", start, group=group))
                pos = self.space(pos + 1, nested)
            elif c == ".":
                items.append(_Item("any", start))
                pos = self.space(pos + 1, nested)
            elif c in "*+?":
                if not has_item:
                    raise self.error(pos, f"'{c}' has nothing before it to repeat")
                if c != "?":
                    items[-1].repeated(start)
                if c != "+":
                    items[-1] = items[-1].optional()
                pos = self.space(pos + 1, nested)
                continue
            elif c == "{":
                if not has_item:
                    raise self.error(pos, "'{' has nothing before it to repeat")
                pos, low, high = self.repetition(pos, nested)
                if high is None or high > 1:
                    items[-1].repeated(start)
                if low == 0:
                    items[-1] = items[-1].optional()
                continue
            else:
                break
            has_item = True
        return pos

    def token_id(self, pos: int) -> int | None:
        """The id of a ``<[N]>`` token reference at ``pos`` (after any ``!``)."""
        if self.at(pos) == "!":
            return None  # "any token but N" always has some token to match
        if self.src.startswith("<[", pos):
            end = self.int_end(pos + 2)
            return int(self.src[pos + 2 : end])
        return None

    def token(self, pos: int) -> int:
        start = pos
        if self.at(pos) == "!":
            pos += 1
        if self.at(pos) != "<":
            raise self.error(pos, "expected '<' to start a token reference")
        pos += 1
        if self.at(pos) == "[":
            pos = self.int_end(pos + 1)
            if self.at(pos) != "]" or self.at(pos + 1) != ">":
                raise self.error(pos, "expected ']>' to close a token id")
            return pos + 2
        close = self.src.find(">", pos)
        if close < 0:
            raise self.error(start, "unterminated token reference '<'")
        return close + 1

    def repetition(self, pos: int, nested: bool) -> tuple[int, int, int | None]:
        """``{m}``, ``{m,}`` or ``{m,n}`` at ``pos``: (end, m, n), n None when unbounded."""
        start = pos
        pos = self.space(pos + 1, nested)
        end = self.int_end(pos)
        low = int(self.src[pos:end])
        high: int | None = low
        pos = self.space(end, nested)
        if self.at(pos) == ",":
            high = None
            pos = self.space(pos + 1, nested)
            if self.at(pos).isascii() and self.at(pos).isdigit():
                end = self.int_end(pos)
                high = int(self.src[pos:end])
                if high < low:
                    raise self.error(start, f"repetition {{{low},{high}}} has max below min")
                pos = self.space(end, nested)
        elif self.at(pos) != "}":
            raise self.error(pos, "expected ',' or '}' in a repetition")
        if self.at(pos) != "}":
            raise self.error(pos, "expected '}' to close a repetition")
        if low > _LLAMA_MAX_REPETITION:
            raise self.error(
                start,
                f"repetition count {low} is over llama.cpp's limit of {_LLAMA_MAX_REPETITION}",
            )
        return self.space(pos + 1, nested), low, high


def _is_character(cp: int) -> bool:
    """A code point that UTF-8 text (and so a token's piece) can hold."""
    return 0 < cp <= _MAX_CODE_POINT and not 0xD800 <= cp <= 0xDFFF


def _describe_code_point(cp: int) -> str:
    if cp > _MAX_CODE_POINT:
        return f"code point U+{cp:04X}, past the last one (U+10FFFF)"
    if cp == 0:
        return "code point U+0000 (NUL)"
    return f"the surrogate U+{cp:04X}"


def _class_matches_something(ranges: list[tuple[int, int]], negated: bool) -> bool:
    """Whether a character class matches at least one character."""
    # The characters are 1..0xD7FF and 0xE000..0x10FFFF.
    segments = ((1, 0xD7FF), (0xE000, _MAX_CODE_POINT))
    if not negated:
        return any(lo <= seg_hi and hi >= seg_lo
                   for lo, hi in ranges for seg_lo, seg_hi in segments)
    merged: list[list[int]] = []
    for lo, hi in sorted(ranges):
        if merged and lo <= merged[-1][1] + 1:
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi])
    # Negated: some character must lie outside every range.
    for seg_lo, seg_hi in segments:
        cursor = seg_lo
        for lo, hi in merged:
            if hi < cursor:
                continue
            if lo > cursor:
                break
            cursor = hi + 1
        if cursor <= seg_hi:
            return True
    return False


class _Item:
    """One element of a GBNF sequence, as far as the analysis needs it."""

    __slots__ = ("kind", "pos", "ref", "group", "token", "nullable_by_repeat", "repeat_pos",
                 "body_optional")

    def __init__(self, kind: str, pos: int, *, ref: str = "",
                 group: list[list[_Item]] | None = None, token: int | None = None) -> None:
        self.kind = kind
        self.pos = pos
        self.ref = ref
        self.group = group or []
        self.token = token
        self.nullable_by_repeat = False
        self.repeat_pos = -1  # where a "*", "+" or "{m,n}" (n > 1) repeats it
        self.body_optional = False  # it could match nothing before that operator

    def repeated(self, pos: int) -> None:
        """This item may occur more than once (the operator at ``pos``)."""
        self.repeat_pos = pos
        self.body_optional = self.nullable_by_repeat

    def optional(self) -> _Item:
        """This item under ``*``, ``?`` or ``{0,...}``: it may match nothing."""
        self.nullable_by_repeat = True
        return self


class _GbnfAnalysis:
    """Proves a parsed grammar usable: token ids in range, no left recursion
    (nullable prefixes included), every reachable rule able to finish."""

    def __init__(self, rules: dict[str, list[list[_Item]]], root: str, n_vocab: int | None) -> None:
        self.rules = rules
        self.root = root
        self.n_vocab = n_vocab
        self.nullable: dict[str, bool] = {}
        self.productive: dict[str, bool] = {}

    def check(self) -> None:
        self._check_tokens()
        self._fixpoints()
        self._check_left_recursion()
        self._check_repeated_nullables()
        self._check_finishes()

    # -- item predicates, given the current rule tables ---------------------

    def _item_nullable(self, item: _Item) -> bool:
        if item.nullable_by_repeat:
            return True
        if item.kind == "ref":
            return self.nullable.get(item.ref, False)
        if item.kind == "group":
            return any(all(self._item_nullable(i) for i in alt) for alt in item.group)
        return False

    def _item_productive(self, item: _Item) -> bool:
        if item.nullable_by_repeat:
            return True
        if item.kind == "ref":
            return self.productive.get(item.ref, False)
        if item.kind == "group":
            return any(all(self._item_productive(i) for i in alt) for alt in item.group)
        return True  # literals, classes, tokens and '.' match something

    def _fixpoints(self) -> None:
        changed = True
        while changed:
            changed = False
            for name, alts in self.rules.items():
                if not self.nullable.get(name) and any(
                        all(self._item_nullable(i) for i in alt) for alt in alts):
                    self.nullable[name] = True
                    changed = True
                if not self.productive.get(name) and any(
                        all(self._item_productive(i) for i in alt) for alt in alts):
                    self.productive[name] = True
                    changed = True

    # -- the checks ------------------------------------------------------------

    def _walk(self, alts: list[list[_Item]]) -> list[_Item]:
        out: list[_Item] = []
        for alt in alts:
            for item in alt:
                out.append(item)
                if item.kind == "group":
                    out.extend(self._walk(item.group))
        return out

    def _check_tokens(self) -> None:
        if self.n_vocab is None:
            return
        for name, alts in self.rules.items():
            for item in self._walk(alts):
                if item.token is not None and not 0 <= item.token < self.n_vocab:
                    raise GrammarError(
                        f"rule {name!r} refers to token <[{item.token}]>, but the vocabulary "
                        f"has tokens 0..{self.n_vocab - 1}")

    def _left_refs(self, alts: list[list[_Item]]) -> list[str]:
        """Rules that may be expanded at the very start of these alternatives:
        each alternative's items up to and including the first that cannot
        match the empty string."""
        refs: list[str] = []
        for alt in alts:
            for item in alt:
                if item.kind == "ref":
                    refs.append(item.ref)
                elif item.kind == "group":
                    refs.extend(self._left_refs(item.group))
                if not self._item_nullable(item):
                    break
        return refs

    def _check_left_recursion(self) -> None:
        edges = {name: self._left_refs(alts) for name, alts in self.rules.items()}
        state: dict[str, int] = {}  # 1: on the current path, 2: done
        for start in self.rules:
            if state.get(start):
                continue
            path = [start]
            stack = [iter(edges[start])]
            state[start] = 1
            while stack:
                nxt = next(stack[-1], None)
                if nxt is None:
                    state[path.pop()] = 2
                    stack.pop()
                    continue
                if state.get(nxt) == 1:
                    cycle = path[path.index(nxt):] + [nxt]
                    raise GrammarError(
                        f"rule {nxt!r} is left-recursive ({' -> '.join(cycle)}, each step able "
                        "to start without consuming text); llama.cpp cannot run it. Rewrite it "
                        "with repetition, e.g. a ::= b (\"x\" b)*")
                if not state.get(nxt) and nxt in edges:
                    state[nxt] = 1
                    path.append(nxt)
                    stack.append(iter(edges[nxt]))

    def _check_repeated_nullables(self) -> None:
        """A repetition of something that can match nothing (``(a? b?)*``):
        llama.cpp expands ``x*`` into ``r ::= x r | ""``, left recursion
        hidden behind ``x``, and its candidate matching then explores every
        way of splitting a token's text between empty and non-empty copies,
        which grows exponentially with the piece (16 tokens did not finish in
        5 minutes with eight optionals). The same language is always written
        without it, e.g. ``(a | b)*`` for ``(a? b?)*``."""
        for name, alts in self.rules.items():
            for item in self._walk(alts):
                if item.repeat_pos < 0:
                    continue
                body = item.body_optional or (
                    self.nullable.get(item.ref, False) if item.kind == "ref" else
                    item.kind == "group" and any(all(self._item_nullable(i) for i in alt)
                                                 for alt in item.group))
                if body:
                    raise GrammarError(
                        f"rule {name!r} repeats something that can match the empty string "
                        f"(the repetition at offset {item.repeat_pos}); llama.cpp's matching "
                        "of such a repetition grows exponentially with each token's text. "
                        "Write the repeated part so that it always consumes text, e.g. "
                        "(a | b)* instead of (a? b?)*")

    def _check_finishes(self) -> None:
        seen = {self.root}
        todo = [self.root]
        while todo:
            name = todo.pop()
            if not self.productive.get(name):
                raise GrammarError(
                    f"rule {name!r} can never finish: every alternative of it needs a rule that "
                    "never finishes (often itself), so no reply could ever be complete")
            for item in self._walk(self.rules.get(name, [])):
                if item.kind == "ref" and item.ref not in seen:
                    seen.add(item.ref)
                    todo.append(item.ref)


# ---------------------------------------------------------------------------
# GBNF text helpers
# ---------------------------------------------------------------------------


def _escape_char(c: str, specials: str) -> str:
    if c in specials:
        return "\\" + c
    if c == "\n":
        return "\\n"
    if c == "\r":
        return "\\r"
    if c == "\t":
        return "\\t"
    code = ord(c)
    if code < 0x20 or code == 0x7F:
        return f"\\x{code:02X}"
    if 0xD800 <= code <= 0xDFFF:
        raise GrammarError(f"text contains a lone surrogate U+{code:04X}")
    return c


def _literal(text: str) -> str:
    """A GBNF string literal matching ``text`` exactly."""
    return '"' + "".join(_escape_char(c, '"\\') for c in text) + '"'


def _class_char(c: str) -> str:
    return _escape_char(c, "\\]-[\"")


def _repeat(item: str, low: int, high: int | None) -> str:
    """``item`` repeated low..high times (high None: unbounded); ``item`` is atomic."""
    if high is not None and high == 0:
        return ""
    if high is None:
        if low == 0:
            return item + "*"
        if low == 1:
            return item + "+"
        return f"{item}{{{low},}}"
    if low == 0 and high == 1:
        return item + "?"
    if low == high:
        return item if low == 1 else f"{item}{{{low}}}"
    return f"{item}{{{low},{high}}}"


def _seq(*parts: str) -> str:
    return " ".join(p for p in parts if p)


def _is_atom(expr: str) -> bool:
    """True when ``expr`` is one GBNF item (name, literal, class or group)."""
    depth, i, n = 0, 0, len(expr)
    while i < n:
        c = expr[i]
        if c in "\"[":
            close = '"' if c == '"' else "]"
            i += 1
            while i < n and expr[i] != close:
                i += 2 if expr[i] == "\\" else 1
        elif c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
        elif depth == 0 and c in " |":
            return False
        i += 1
    return True


def _group(alternatives: list[str]) -> str:
    """An alternation as one atom; an empty alternative makes it optional."""
    optional = "" in alternatives
    alts = list(dict.fromkeys(a for a in alternatives if a))
    if not alts:
        return ""
    if len(alts) == 1 and _is_atom(alts[0]):
        atom = alts[0]
        if optional and atom[-1] in "?*":
            return atom
        if optional and atom[-1] in "+}":
            atom = f"( {atom} )"
    else:
        atom = f"( {' | '.join(alts)} )"
    return atom + "?" if optional else atom


# ---------------------------------------------------------------------------
# Rule set shared by one grammar
# ---------------------------------------------------------------------------

# Maximum integral digits, fraction digits and exponent digits a generated
# number may have. Bounding them keeps a model from emitting digits forever.
_INT_DIGITS: Final[int] = 19
_FRAC_DIGITS: Final[int] = 16
_EXP_DIGITS: Final[int] = 4
# Above this, a maxLength / maxItems bound is not written into the grammar
# (llama.cpp expands a bounded repetition into one rule per optional step).
_MAX_BOUNDED_REPEAT: Final[int] = 1000

_JSON_CHAR: Final[str] = (
    '[\\x20-\\x21\\x23-\\x5B\\x5D-\\uD7FF\\uE000-\\U0010FFFF] | "\\\\" ( ["\\\\/bfnrt] | "u" ( '
    '[0-9a-cA-Ce-fE-F] [0-9a-fA-F]{3} | [dD] [0-7] [0-9a-fA-F]{2} | '
    '[dD] [89abAB] [0-9a-fA-F]{2} "\\\\u" [dD] [c-fC-F] [0-9a-fA-F]{2} ) )'
)

# Whitespace between JSON tokens: nothing, one space, or a newline and an
# indent of up to 20 spaces or tabs. Bounded so a model cannot pad forever.
_PRIMITIVES: Final[dict[str, tuple[str, tuple[str, ...]]]] = {
    "ws": ('( " " | "\\n" [ \\t]{0,20} )?', ()),
    # One JSON string character, which is one Unicode scalar value: a raw code
    # point other than a quote, a backslash, a control character or a surrogate, or an
    # escape. A \\u escape names a non-surrogate or a whole surrogate pair,
    # never a lone surrogate (which no UTF-8 text, and no Python str that is
    # re-encoded, can hold).
    "json-char": (_JSON_CHAR, ()),
    "json-string": ('"\\"" json-char* "\\""', ("json-char",)),
    "json-int": (f'"-"? ( "0" | [1-9] [0-9]{{0,{_INT_DIGITS - 1}}} )', ()),
    "json-number": (
        f'json-int ( "." [0-9]{{1,{_FRAC_DIGITS}}} )? ( [eE] [-+]? [0-9]{{1,{_EXP_DIGITS}}} )?',
        ("json-int",),
    ),
    "json-bool": ('"true" | "false"', ()),
    "json-null": ('"null"', ()),
    "json-value": (
        "json-object | json-array | json-string | json-number | json-bool | json-null",
        ("json-object", "json-array", "json-string", "json-number", "json-bool", "json-null"),
    ),
    "json-member": ('json-string ws ":" ws json-value', ("json-string", "ws", "json-value")),
    "json-object": (
        '"{" ws "}" | "{" ws json-member ( "," ws json-member )* ws "}"',
        ("ws", "json-member"),
    ),
    "json-array": (
        '"[" ws "]" | "[" ws json-value ( "," ws json-value )* ws "]"',
        ("ws", "json-value"),
    ),
    # Calendar dates 0001-01-01 .. 9999-12-31, exactly: days per month, and
    # February 29 only in leap years (Python's date.fromisoformat, which
    # jsonschema's "date" check uses, has no year 0).
    "json-year": (
        '[1-9] [0-9]{3} | "0" ( [1-9] [0-9]{2} | "0" ( [1-9] [0-9] | "0" [1-9] ) )',
        (),
    ),
    "json-leap-year": (
        # Divisible by 4 and not by 100, or divisible by 400 (never 0000).
        '[0-9]{2} ( "0" [48] | [2468] [048] | [13579] [26] ) '
        '| ( "0" [48] | [2468] [048] | [13579] [26] ) "00"',
        (),
    ),
    "json-date": (
        'json-year "-" ( ( "0" [13578] | "1" [02] ) "-" ( "0" [1-9] | [12] [0-9] | "3" [01] ) '
        '| ( "0" [469] | "11" ) "-" ( "0" [1-9] | [12] [0-9] | "30" ) '
        '| "02-" ( "0" [1-9] | "1" [0-9] | "2" [0-8] ) ) '
        '| json-leap-year "-02-29"',
        ("json-year", "json-leap-year"),
    ),
    "json-time": (
        '( [01] [0-9] | "2" [0-3] ) ":" [0-5] [0-9] ":" [0-5] [0-9] ( "." [0-9]{1,9} )? '
        '( "Z" | [+\\-] ( [01] [0-9] | "2" [0-3] ) ":" [0-5] [0-9] )',
        (),
    ),
    "json-date-time": ('json-date "T" json-time', ("json-date", "json-time")),
    "json-uuid": (
        '[0-9a-fA-F]{8} "-" [0-9a-fA-F]{4} "-" [0-9a-fA-F]{4} "-" [0-9a-fA-F]{4} "-" '
        "[0-9a-fA-F]{12}",
        (),
    ),
    # Dotted-quad IPv4: four decimal octets 0..255 without leading zeros
    # (Python's ipaddress, jsonschema's "ipv4" check, refuses those).
    "json-ipv4-octet": ('"25" [0-5] | "2" [0-4] [0-9] | "1" [0-9] [0-9] | [1-9] [0-9] | [0-9]', ()),
    "json-ipv4": (
        'json-ipv4-octet "." json-ipv4-octet "." json-ipv4-octet "." json-ipv4-octet',
        ("json-ipv4-octet",),
    ),
    # A plain ASCII address: dot-separated atoms, "@", a domain of two or
    # more LDH labels. Much narrower than RFC 5322 (no quoted local parts,
    # no address literals), so stricter checkers accept it too.
    "json-email-atom": ("[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+", ()),
    "json-email-label": ("[A-Za-z0-9] ( [A-Za-z0-9-]* [A-Za-z0-9] )?", ()),
    "json-email": (
        'json-email-atom ( "." json-email-atom )* "@" json-email-label ( "." json-email-label )+',
        ("json-email-atom", "json-email-label"),
    ),
}

_FORMAT_RULES: Final[dict[str, str]] = {
    "date": "json-date",
    "time": "json-time",
    "date-time": "json-date-time",
    "uuid": "json-uuid",
    "ipv4": "json-ipv4",
    "email": "json-email",
    "idn-email": "json-email",
}


# Shortest and longest (None: unbounded) value of each format, in characters.
_FORMAT_LENGTHS: Final[dict[str, tuple[int, int | None]]] = {
    "date": (10, 10),
    "time": (9, 24),
    "date-time": (20, 35),
    "uuid": (36, 36),
    "ipv4": (7, 15),
    "email": (5, None),
    "idn-email": (5, None),
}


class _RuleSet:
    """The rules of one grammar under unique llama.cpp-safe names, root first."""

    def __init__(self) -> None:
        self._rules: dict[str, str | None] = {}

    def primitive(self, name: str) -> str:
        if name not in self._rules:
            body, deps = _PRIMITIVES[name]
            self._rules[name] = body
            for dep in deps:
                self.primitive(dep)
        return name

    def reserve(self, hint: str) -> str:
        base = re.sub(r"[^A-Za-z0-9-]+", "-", hint).strip("-") or "rule"
        if base in _PRIMITIVES:
            base += "-rule"
        name, counter = base, 1
        while name in self._rules:
            counter += 1
            name = f"{base}-{counter}"
        self._rules[name] = None
        return name

    def define(self, name: str, body: str) -> None:
        self._rules[name] = body if body else '""'

    def add(self, hint: str, body: str) -> str:
        name = self.reserve(hint)
        self.define(name, body)
        return name

    def render(self) -> str:
        lines = []
        for name, body in sorted(self._rules.items(), key=lambda item: item[0] != "root"):
            if body is None:  # pragma: no cover - a converter bug
                raise GrammarError(f"internal error: rule {name!r} was reserved but never defined")
            lines.append(f"{name} ::= {body}")
        return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------
# Number ranges
# ---------------------------------------------------------------------------


def _digit(lo: int, hi: int) -> str:
    if lo == hi:
        return f'"{lo}"'
    if lo == 0 and hi == 9:
        return "[0-9]"
    return f"[{lo}-{hi}]"


_Tail = Callable[[bool, bool], "str | None"]


def _bounded_digits(lo: str, hi: str, tail: _Tail) -> str | None:
    """Digit strings ``s`` of len(lo) with lo <= s <= hi, each followed by a tail.

    ``tail(tight_lo, tight_hi)`` gives what may follow when ``s`` equals the
    low / high bound (None when nothing may follow, removing that branch).
    """
    n = len(lo)
    tails: dict[tuple[bool, bool], str | None] = {}

    def end(tl: bool, th: bool) -> str | None:
        if (tl, th) not in tails:
            tails[(tl, th)] = tail(tl, th)
        return tails[(tl, th)]

    def walk(i: int, tl: bool, th: bool) -> str | None:
        # A bound whose remaining digits are all 0 (low) / 9 (high) constrains
        # nothing more than the free case when its tail is the same.
        both = (False, True)
        if tl and lo[i:] == "0" * (n - i) and all(end(True, x) == end(False, x) for x in both):
            tl = False
        if th and hi[i:] == "9" * (n - i) and all(end(x, True) == end(x, False) for x in both):
            th = False
        if i == n:
            return end(tl, th)
        if not tl and not th:
            rest = end(False, False)
            return None if rest is None else _seq(_repeat("[0-9]", n - i, n - i), rest)
        lo_d = int(lo[i]) if tl else 0
        hi_d = int(hi[i]) if th else 9
        if tl and th and lo_d == hi_d:
            sub = walk(i + 1, True, True)
            return None if sub is None else _seq(f'"{lo_d}"', sub)
        alts: list[str] = []
        if tl:
            sub = walk(i + 1, True, False)
            if sub is not None:
                alts.append(_seq(f'"{lo_d}"', sub))
        a, b = lo_d + (1 if tl else 0), hi_d - (1 if th else 0)
        if a <= b:
            sub = walk(i + 1, False, False)
            if sub is not None:
                alts.append(_seq(_digit(a, b), sub))
        if th:
            sub = walk(i + 1, False, True)
            if sub is not None:
                alts.append(_seq(f'"{hi_d}"', sub))
        return _group(alts) if alts else None

    return walk(0, True, True)


def _fraction(
    lo: str | None, lo_strict: bool, hi: str | None, hi_strict: bool, max_digits: int
) -> str | None:
    """An optional ``"." digits`` part whose value 0.F satisfies the bounds.

    ``lo`` / ``hi`` are the fraction digits of a bound the integer part equals
    (trailing zeros stripped; None when that bound no longer applies).
    """

    def end_ok(lo_rest: str | None, hi_rest: str | None) -> bool:
        lo_ok = lo_rest is None or (lo_rest == "" and not lo_strict)
        hi_ok = hi_rest is None or hi_rest != "" or not hi_strict
        return lo_ok and hi_ok

    def digits(lo_rest: str | None, hi_rest: str | None, used: int, need: bool) -> str | None:
        room = max_digits - used
        if lo_rest == "" and not lo_strict:
            lo_rest = None  # equal to the low bound so far: any further digits keep it so
        if lo_rest is None and hi_rest == "":
            # Equal to the high bound so far: only zeros may follow. The digit
            # caps are ours, not the schema's, so shortcuts may exceed them.
            if hi_strict:
                return None
            return _repeat('"0"', 1 if need else 0, max(room, 1))
        if lo_rest == "" and hi_rest is None:
            # Equal to a strict low bound so far: some non-zero digit must come.
            free = _repeat("[0-9]", 0, max(room - 1, 1))
            return _seq(_repeat('"0"', 0, max(room - 1, 1)), "[1-9]", free)
        if lo_rest is None and hi_rest is None:
            if room == 0:
                return None if need else ""
            return _repeat("[0-9]", 1 if need else 0, room)
        alts: list[str] = []
        if not need and end_ok(lo_rest, hi_rest):
            alts.append("")
        if room > 0:
            lo_d = (int(lo_rest[0]) if lo_rest else 0) if lo_rest is not None else 0
            hi_d = (int(hi_rest[0]) if hi_rest else 0) if hi_rest is not None else 9
            lo_next = lo_rest[1:] if lo_rest else ""
            hi_next = hi_rest[1:] if hi_rest else ""
            tl, th = lo_rest is not None, hi_rest is not None
            branches: list[tuple[str, str | None, str | None]] = []
            if tl and th and lo_d == hi_d:
                branches.append((f'"{lo_d}"', lo_next, hi_next))
            elif lo_d <= hi_d:
                if tl:
                    branches.append((f'"{lo_d}"', lo_next, None))
                a, b = lo_d + (1 if tl else 0), hi_d - (1 if th else 0)
                if a <= b:
                    branches.append((_digit(a, b), None, None))
                if th:
                    branches.append((f'"{hi_d}"', None, hi_next))
            for head, lo_n, hi_n in branches:
                sub = digits(lo_n, hi_n, used + 1, False)
                if sub is not None:
                    alts.append(_seq(head, sub))
        if not alts:
            return None
        return _group(alts) if alts != [""] else ""

    if max_digits == 0:
        return "" if end_ok(lo, hi) else None
    alts: list[str] = []
    if end_ok(lo, hi):
        alts.append("")
    body = digits(lo, hi, 0, True)
    if body is not None:
        alts.append(_seq('"."', body))
    if not alts:
        return None
    return _group(alts) if alts != [""] else ""


def _split(value: Decimal) -> tuple[int, str]:
    """Integral part and stripped fraction digits of a non-negative decimal."""
    text = format(value, "f")
    whole, _, frac = text.partition(".")
    return int(whole), frac.rstrip("0")


def _magnitude(
    lo: Decimal, lo_strict: bool, hi: Decimal | None, hi_strict: bool, frac_digits: int
) -> str | None:
    """Unsigned JSON numbers (no exponent) in the range lo..hi, lo >= 0."""
    lo_int, lo_frac = _split(lo)
    hi_int, hi_frac = _split(hi) if hi is not None else (0, "")
    if hi is not None and len(str(hi_int)) > _INT_DIGITS:
        hi = None
    lo_len = len(str(lo_int))
    if lo_len > _INT_DIGITS:
        return None
    hi_len = len(str(hi_int)) if hi is not None else lo_len
    alts: list[str] = []
    for length in range(lo_len, hi_len + 1):
        lo_real = length == lo_len
        hi_real = hi is not None and length == hi_len
        lo_s = str(lo_int) if lo_real else "1" + "0" * (length - 1)
        hi_s = str(hi_int) if hi_real else "9" * length
        if lo_s > hi_s:
            continue

        def tail(
            tl: bool, th: bool, lo_real: bool = lo_real, hi_real: bool = hi_real
        ) -> str | None:
            return _fraction(
                lo_frac if tl and lo_real else None,
                lo_strict,
                hi_frac if th and hi_real else None,
                hi_strict,
                frac_digits,
            )

        expr = _bounded_digits(lo_s, hi_s, tail)
        if expr is not None:
            alts.append(expr)
    if hi is None and lo_len < _INT_DIGITS:
        free_frac = _fraction(None, False, None, False, frac_digits)
        alts.append(_seq("[1-9]", _repeat("[0-9]", lo_len, _INT_DIGITS - 1), free_frac or ""))
    return _group(alts) if alts else None


def _number_range(
    lo: Decimal | None, lo_strict: bool, hi: Decimal | None, hi_strict: bool, integer: bool
) -> str:
    """A GBNF expression for JSON numbers (integers when ``integer``) in range."""
    if integer:
        if lo is not None:
            lo = (lo.to_integral_value(ROUND_FLOOR) + 1) if lo_strict else lo.to_integral_value(
                ROUND_CEILING
            )
        if hi is not None:
            hi = (hi.to_integral_value(ROUND_CEILING) - 1) if hi_strict else hi.to_integral_value(
                ROUND_FLOOR
            )
        lo_strict = hi_strict = False
    if lo is not None and hi is not None and (lo > hi or (lo == hi and (lo_strict or hi_strict))):
        raise GrammarError(f"the numeric range [{lo}, {hi}] admits no value")
    frac_digits = 0 if integer else _FRAC_DIGITS
    alts: list[str] = []
    if hi is None or hi > 0 or (hi == 0 and not hi_strict):
        if lo is not None and lo >= 0:
            m = _magnitude(lo, lo_strict, hi, hi_strict, frac_digits)
        else:
            m = _magnitude(Decimal(0), False, hi, hi_strict, frac_digits)
        if m is not None:
            alts.append(m)
    if lo is None or lo < 0:
        if hi is not None and hi <= 0:
            m_lo, m_lo_strict = -hi, hi_strict
        else:
            m_lo, m_lo_strict = Decimal(0), False
        m_hi, m_hi_strict = (-lo, lo_strict) if lo is not None else (None, False)
        m = _magnitude(m_lo, m_lo_strict, m_hi, m_hi_strict, frac_digits)
        if m is not None:
            alts.append(_seq('"-"', m))
    if not alts:
        raise GrammarError("the numeric range admits no value that fits in a generated number")
    return _group(alts)


# ---------------------------------------------------------------------------
# JSON schema -> GBNF
# ---------------------------------------------------------------------------

_ANNOTATIONS: Final[frozenset[str]] = frozenset(
    {
        "title", "description", "default", "examples", "example", "$schema", "$id",
        "$comment", "$anchor", "deprecated", "readOnly", "writeOnly", "contentMediaType",
        "contentEncoding", "contentSchema", "discriminator", "xml", "externalDocs",
        "$defs", "definitions", "strict",
    }
)

_UNSUPPORTED: Final[frozenset[str]] = frozenset(
    {
        "pattern", "patternProperties", "propertyNames", "minProperties", "maxProperties",
        "dependentRequired", "dependentSchemas", "dependencies", "uniqueItems", "contains",
        "minContains", "maxContains", "multipleOf", "not", "if", "then", "else",
        "unevaluatedProperties", "unevaluatedItems", "$dynamicRef", "$recursiveRef",
    }
)

_TYPES: Final[frozenset[str]] = frozenset(
    {"object", "array", "string", "number", "integer", "boolean", "null"}
)

_OBJECT_KEYS = ("properties", "required", "additionalProperties")
_ARRAY_KEYS = ("items", "prefixItems", "minItems", "maxItems", "additionalItems")
_STRING_KEYS = ("minLength", "maxLength", "format")
_NUMBER_KEYS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")


def _compact_json(value: Any) -> str:
    try:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise GrammarError(f"schema value {value!r} is not JSON: {exc}") from None
    except RecursionError:  # a const / enum value nested past the interpreter's limit
        raise GrammarError("a schema value ('const' or 'enum') nests too deeply") from None


def _decimal(value: object, keyword: str) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise GrammarError(f"schema keyword {keyword!r} must be a number, got {value!r}")
    try:
        number = Decimal(str(value)) if isinstance(value, float) else Decimal(value)
    except InvalidOperation:  # pragma: no cover - str(float) is always parseable
        raise GrammarError(
            f"schema keyword {keyword!r} is not a usable number: {value!r}"
        ) from None
    if not number.is_finite():
        raise GrammarError(f"schema keyword {keyword!r} must be finite, got {value!r}")
    return number


def _count(schema: Mapping[str, Any], keyword: str) -> int | None:
    value = schema.get(keyword)
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise GrammarError(
            f"schema keyword {keyword!r} must be a non-negative integer, got {value!r}"
        )
    return value


class _SchemaConverter:
    """Converts one schema document into rules of a shared :class:`_RuleSet`."""

    def __init__(self, rules: _RuleSet, document: object, *, strict: bool, prefix: str) -> None:
        self.rules = rules
        self.document = document
        self.strict = strict
        self.prefix = prefix
        self.ref_rules: dict[str, str] = {}
        self.depth = 0

    # -- entry points -------------------------------------------------------

    def convert(self, schema: object, hint: str) -> str:
        """Return the name of a rule matching instances of ``schema``."""
        name = self.rules.reserve(hint)
        self.rules.define(name, self.visit(schema, name))
        return name

    def visit(self, schema: object, hint: str) -> str:
        """Return a GBNF expression (alternatives allowed) for ``schema``."""
        # Every nested schema is one more level of Python recursion here (and
        # of rules in the grammar): bound it well below the interpreter's limit.
        if self.depth >= MAX_SCHEMA_DEPTH:
            raise GrammarError(f"schema at {hint!r} nests deeper than {MAX_SCHEMA_DEPTH} levels")
        self.depth += 1
        try:
            return self._visit(schema, hint)
        finally:
            self.depth -= 1

    def _visit(self, schema: object, hint: str) -> str:
        if schema is True or (isinstance(schema, Mapping) and not schema):
            return self.rules.primitive("json-value")
        if schema is False:
            raise GrammarError(f"schema at {hint!r} is false: no value can match it")
        if not isinstance(schema, Mapping):
            raise GrammarError(f"schema at {hint!r} must be an object or a bool, got {schema!r}")
        self.check_keywords(schema, hint)

        if "$ref" in schema:
            return self.visit_ref(schema, hint)
        if "allOf" in schema:
            return self.visit(self.merge_all_of(schema, hint), hint)
        if schema.get("nullable") is True:
            rest = {k: v for k, v in schema.items() if k != "nullable"}
            return _seq(self.visit(rest, hint)) + " | " + self.rules.primitive("json-null")
        if "const" in schema:
            return _literal(_compact_json(schema["const"]))
        if "enum" in schema:
            return self.visit_enum(schema, hint)
        for union in ("anyOf", "oneOf"):
            if union in schema:
                return self.visit_union(schema, union, hint)

        kind = schema.get("type")
        if kind is None:
            kind = self.infer_type(schema)
        if isinstance(kind, list):
            if not kind or not all(isinstance(k, str) for k in kind):
                raise GrammarError(f"schema 'type' at {hint!r} must be a non-empty list of names")
            alts = [self.visit({**schema, "type": k}, f"{hint}-{k}") for k in dict.fromkeys(kind)]
            return " | ".join(f"( {a} )" if "|" in a else a for a in alts)
        if kind is None:
            return self.rules.primitive("json-value")
        if not isinstance(kind, str) or kind not in _TYPES:
            raise GrammarError(f"schema 'type' at {hint!r} is not a JSON type: {kind!r}")
        if kind == "object":
            return self.visit_object(schema, hint)
        if kind == "array":
            return self.visit_array(schema, hint)
        if kind == "string":
            return self.visit_string(schema, hint)
        if kind in ("number", "integer"):
            return self.visit_number(schema, kind == "integer")
        if kind == "boolean":
            return self.rules.primitive("json-bool")
        return self.rules.primitive("json-null")

    # -- keyword bookkeeping --------------------------------------------------

    def check_keywords(self, schema: Mapping[str, Any], hint: str) -> None:
        if not self.strict:
            return
        bad = sorted(k for k in schema if k in _UNSUPPORTED)
        if bad:
            raise GrammarError(
                f"schema at {hint!r} uses {', '.join(repr(k) for k in bad)}, which cannot be "
                "enforced by a grammar; remove it or convert with strict=False to ignore it"
            )

    @staticmethod
    def infer_type(schema: Mapping[str, Any]) -> str | None:
        found = set()
        if any(k in schema for k in _OBJECT_KEYS):
            found.add("object")
        if any(k in schema for k in _ARRAY_KEYS):
            found.add("array")
        if any(k in schema for k in _STRING_KEYS):
            found.add("string")
        if any(k in schema for k in _NUMBER_KEYS):
            found.add("number")
        if len(found) > 1:
            raise GrammarError(
                f"schema without 'type' mixes keywords of {sorted(found)}; add an explicit 'type'"
            )
        return found.pop() if found else None

    # -- references and combinators ----------------------------------------

    def resolve(self, ref: object) -> object:
        if not isinstance(ref, str) or not ref.startswith("#"):
            raise GrammarError(f"only local '$ref' values ('#/...') are supported, got {ref!r}")
        target: object = self.document
        pointer = unquote(ref[1:])
        if pointer:
            if not pointer.startswith("/"):
                raise GrammarError(f"'$ref' {ref!r} is not a JSON pointer ('#/$defs/Name')")
            for raw in pointer[1:].split("/"):
                part = raw.replace("~1", "/").replace("~0", "~")
                if isinstance(target, Mapping) and part in target:
                    target = target[part]
                elif isinstance(target, list) and part.isdigit() and int(part) < len(target):
                    target = target[int(part)]
                else:
                    raise GrammarError(f"'$ref' {ref!r} points at nothing in the schema")
        return target

    def visit_ref(self, schema: Mapping[str, Any], hint: str) -> str:
        ref = schema["$ref"]
        siblings = {k: v for k, v in schema.items() if k != "$ref" and k not in _ANNOTATIONS}
        if siblings:
            merged = self.merge_all_of({"allOf": [self.resolve(ref), siblings]}, hint)
            return self.visit(merged, hint)
        key = str(ref)
        name = self.ref_rules.get(key)
        if name is None:
            label = key.rsplit("/", 1)[-1] if key != "#" else "root"
            name = self.rules.reserve(f"{self.prefix}ref-{label}")
            self.ref_rules[key] = name
            self.rules.define(name, self.visit(self.resolve(ref), name))
        return name

    def merge_all_of(self, schema: Mapping[str, Any], hint: str) -> dict[str, Any]:
        """One schema equivalent to an ``allOf`` (with its siblings), or GrammarError.

        ``additionalProperties: false`` keeps JSON Schema's meaning: it sees
        only the properties declared beside it, so the merged object may use
        only names every such closed part declares.
        """
        parts = schema.get("allOf")
        if not isinstance(parts, list) or not parts:
            raise GrammarError(f"'allOf' at {hint!r} must be a non-empty list of schemas")
        outer = {k: v for k, v in schema.items() if k != "allOf"}
        resolved: list[Mapping[str, Any]] = [outer]
        for part in parts:
            seen: set[str] = set()
            while isinstance(part, Mapping) and "$ref" in part:
                ref = str(part["$ref"])
                if ref in seen:
                    raise GrammarError(
                        f"'allOf' at {hint!r} follows a '$ref' cycle through {ref!r}"
                    )
                seen.add(ref)
                rest = {k: v for k, v in part.items() if k != "$ref"}
                target = self.resolve(ref)
                if target is True:
                    target = {}
                if not isinstance(target, Mapping):
                    raise GrammarError(f"'allOf' at {hint!r} cannot merge {ref!r}")
                part = self.merge_all_of({"allOf": [target, rest]}, hint) if rest else target
            if part is True:
                continue
            if not isinstance(part, Mapping):
                raise GrammarError(f"'allOf' at {hint!r} contains a non-object schema {part!r}")
            if "allOf" in part:
                part = self.merge_all_of(part, hint)
            resolved.append(part)

        closed: list[set[str]] = []
        open_schemas = 0
        object_parts = 0
        for part in resolved:
            extra = part.get("additionalProperties")
            if "properties" in part or extra not in (None, True):
                object_parts += 1
            if extra is False:
                closed.append(set(part.get("properties") or {}))
            elif extra is not None and extra is not True:
                open_schemas += 1
        if open_schemas and object_parts > 1:
            raise GrammarError(
                f"'allOf' at {hint!r} combines an 'additionalProperties' schema with other "
                "object parts, which is not supported"
            )

        merged: dict[str, Any] = {}
        for part in resolved:
            for key, value in part.items():
                if key in _ANNOTATIONS:
                    merged.setdefault(key, value)
                elif key == "additionalProperties" and value in (True, False):
                    continue
                elif key not in merged:
                    merged[key] = value
                elif key == "properties" and isinstance(value, Mapping):
                    props = dict(merged[key])
                    for prop, sub in value.items():
                        if prop in props and props[prop] != sub:
                            props[prop] = {"allOf": [props[prop], sub]}
                        else:
                            props[prop] = sub
                    merged[key] = props
                elif key == "required" and isinstance(value, list):
                    merged[key] = list(dict.fromkeys([*merged[key], *value]))
                elif merged[key] != value:
                    raise GrammarError(
                        f"'allOf' at {hint!r} combines different values of {key!r}, which is "
                        "not supported"
                    )
        if closed:
            allowed = set.intersection(*closed)
            for name in merged.get("required", []):
                if name not in allowed:
                    raise GrammarError(
                        f"'allOf' at {hint!r} requires {name!r}, which an "
                        "'additionalProperties: false' part forbids: no value matches"
                    )
            props = merged.get("properties") or {}
            merged["properties"] = {k: v for k, v in props.items() if k in allowed}
            merged["additionalProperties"] = False
        return merged

    def visit_union(self, schema: Mapping[str, Any], keyword: str, hint: str) -> str:
        options = schema[keyword]
        if not isinstance(options, list) or not options:
            raise GrammarError(f"'{keyword}' at {hint!r} must be a non-empty list of schemas")
        rest = {k: v for k, v in schema.items() if k != keyword and k not in _ANNOTATIONS}
        alts = []
        branches: list[object] = []
        for i, option in enumerate(options):
            sub: object = option
            if rest:
                sub = {"allOf": [rest, option]}
            branches.append(sub)
            alts.append(self.convert(sub, f"{hint}-{i}"))
        if keyword == "oneOf" and self.strict:
            self.check_exclusive(branches, hint)
        return " | ".join(dict.fromkeys(alts))

    # -- oneOf exclusivity ----------------------------------------------------
    #
    # A value valid against two 'oneOf' branches is invalid, and a grammar (a
    # union of the branches' grammars) cannot subtract one branch from
    # another. So the union is used only when it is proven that whatever a
    # branch's grammar writes fails every other branch's schema. The proofs
    # compare what a branch *writes* (a subset of its schema) with what the
    # other branch *accepts* (its schema, read conservatively: any doubt means
    # "might accept"). Three proofs, per ordered pair of branches:
    #
    # - JSON types: the types the writer can produce are none that the other
    #   accepts ("integer" counts as "number": 1.0 is an integer);
    # - values: the writer is a const / enum, and no value is one the other
    #   accepts (different type, or not among the other's const / enum);
    # - a discriminator: the writer requires a property whose schema is a
    #   const / enum, and the other declares that property with a const /
    #   enum sharing no value.

    def check_exclusive(self, branches: list[object], hint: str) -> None:
        for i, writer in enumerate(branches):
            for j, other in enumerate(branches):
                if i != j and not self.excludes(writer, other):
                    raise GrammarError(
                        f"'oneOf' at {hint!r}: branches {i} and {j} may both match one value, "
                        "and a grammar cannot enforce that exactly one does; use 'anyOf', "
                        "make the branches' types or const / enum values disjoint, or give "
                        "object branches a required property with a distinct 'const'"
                    )

    def excludes(self, writer: object, other: object) -> bool:
        """True when nothing the grammar of ``writer`` produces validates ``other``."""
        w = self.flatten(writer)
        o = self.flatten(other)
        if not self.kinds(w, written=True) & self.kinds(o, written=False):
            return True
        values = self.finite_values(w, written=True)
        if values is not None:
            o_kinds = self.kinds(o, written=False)
            o_values = self.finite_values(o, written=False)
            if all(
                _kind_of(v) not in o_kinds or (o_values is not None and _canonical(v) not in
                                               {_canonical(x) for x in o_values})
                for v in values
            ):
                return True
        if isinstance(w, Mapping) and isinstance(o, Mapping):
            if self.kinds(w, written=True) != {"object"}:
                return False
            w_props, o_props = w.get("properties"), o.get("properties")
            required = w.get("required")
            if not (isinstance(w_props, Mapping) and isinstance(o_props, Mapping)
                    and isinstance(required, list)):
                return False
            for name in required:
                if not isinstance(name, str) or name not in w_props or name not in o_props:
                    continue
                mine = self.finite_values(self.flatten(w_props[name]), written=True)
                theirs = self.finite_values(self.flatten(o_props[name]), written=False)
                if mine is not None and theirs is not None:
                    keys = {_canonical(x) for x in theirs}
                    if all(_canonical(v) not in keys for v in mine):
                        return True
        return False

    def flatten(self, schema: object) -> object:
        """``schema`` with top-level ``$ref`` followed and ``allOf`` merged."""
        seen: set[str] = set()
        for _ in range(64):
            if not isinstance(schema, Mapping):
                return schema
            if "$ref" in schema:
                ref = str(schema["$ref"])
                if ref in seen:
                    return True  # a cycle: know nothing
                seen.add(ref)
                siblings = {k: v for k, v in schema.items() if k != "$ref" and k not in _ANNOTATIONS}
                target = self.resolve(schema["$ref"])
                schema = self.merge_all_of({"allOf": [target, siblings]}, "oneOf") if siblings else target
            elif "allOf" in schema:
                schema = self.merge_all_of(schema, "oneOf")
            else:
                return schema
        return True

    def kinds(self, schema: object, *, written: bool, depth: int = 0) -> frozenset[str]:
        """JSON types (integer as number) a schema's grammar writes / its schema accepts.

        Always a superset: unknown means every type.
        """
        schema = self.flatten(schema)
        if schema is False:
            return frozenset()
        if not isinstance(schema, Mapping) or depth > 32:
            return _ALL_KINDS
        if schema.get("nullable") is True:
            rest = {k: v for k, v in schema.items() if k != "nullable"}
            base = self.kinds(rest, written=written, depth=depth + 1)
            # OpenAPI's nullable: the grammar writes null, a validator ignores it.
            return base | {"null"} if written else base
        declared = schema.get("type")
        if isinstance(declared, str):
            declared = [declared]
        if isinstance(declared, list) and all(isinstance(k, str) for k in declared):
            typed = frozenset("number" if k == "integer" else k for k in declared)
        else:
            typed = _ALL_KINDS
        values = self.finite_values(schema, written=written)
        if values is not None:
            found = frozenset(_kind_of(v) for v in values)
            return found if written else found & typed
        result = typed
        for union in ("anyOf", "oneOf"):
            options = schema.get(union)
            if isinstance(options, list) and options:
                joined = frozenset().union(
                    *(self.kinds(o, written=written, depth=depth + 1) for o in options)
                )
                result = result & joined
        if written and result == _ALL_KINDS and not isinstance(schema.get("type"), (str, list)):
            try:
                inferred = self.infer_type(schema)
            except GrammarError:
                inferred = None
            if inferred is not None:
                result = frozenset({inferred})
        return result

    def finite_values(self, schema: object, *, written: bool) -> list[Any] | None:
        """The values of a const / enum schema (None: not a finite set).

        Written: exactly what the grammar writes (const wins over enum, enum
        values are filtered by 'type'). Accepted: a superset of what validates.
        """
        if not isinstance(schema, Mapping):
            return None
        extra: list[Any] = [None] if written and schema.get("nullable") is True else []
        if "const" in schema:
            return [schema["const"], *extra]
        values = schema.get("enum")
        if isinstance(values, list) and values:
            declared = schema.get("type")
            kinds = ({declared} if isinstance(declared, str)
                     else set(declared) if isinstance(declared, list) else None)
            if kinds is not None:
                values = [v for v in values if _json_type_matches(v, kinds)]
            return [*values, *extra]
        return None

    def visit_enum(self, schema: Mapping[str, Any], hint: str) -> str:
        values = schema["enum"]
        if not isinstance(values, list) or not values:
            raise GrammarError(f"'enum' at {hint!r} must be a non-empty list")
        kind = schema.get("type")
        kinds = {kind} if isinstance(kind, str) else set(kind) if isinstance(kind, list) else None
        if kinds is not None:
            values = [v for v in values if _json_type_matches(v, kinds)]
            if not values:
                raise GrammarError(f"no 'enum' value at {hint!r} has the schema's 'type'")
        return " | ".join(dict.fromkeys(_literal(_compact_json(v)) for v in values))

    # -- types ----------------------------------------------------------------

    def visit_object(self, schema: Mapping[str, Any], hint: str) -> str:
        properties = schema.get("properties", {})
        if not isinstance(properties, Mapping):
            raise GrammarError(f"'properties' at {hint!r} must be an object")
        required = schema.get("required", [])
        if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
            raise GrammarError(f"'required' at {hint!r} must be a list of property names")
        missing = [r for r in required if r not in properties]
        additional = schema.get("additionalProperties")
        if missing:
            # A required name without a declared schema must still be written:
            # declare it, with the additional-properties schema or any value.
            fill = True if additional in (None, False) else additional
            properties = {**properties, **{r: fill for r in missing}}
        ws = self.rules.primitive("ws")

        extra: str | None = None
        if additional is None:
            if not properties:
                return self.rules.primitive("json-object")
        elif additional is not False:
            value = self.convert(additional, f"{hint}-additional") if additional is not True else (
                self.rules.primitive("json-value")
            )
            extra = self.rules.add(
                f"{hint}-extra", _seq(self.rules.primitive("json-string"), ws, '":"', ws, value)
            )

        members = []
        for key, sub in properties.items():
            if not isinstance(key, str):  # pragma: no cover - JSON keys are strings
                raise GrammarError(f"property name {key!r} at {hint!r} is not a string")
            value = self.convert(sub, f"{hint}-{key}")
            member = _seq(_literal(json.dumps(key, ensure_ascii=False)), ws, '":"', ws, value)
            members.append((member, key in required))
        return self.object_body(members, extra, hint)

    def object_body(self, members: list[tuple[str, bool]], extra: str | None, hint: str) -> str:
        """Members in declared order; optional ones may be skipped, commas stay right."""
        ws = self.rules.primitive("ws")
        n = len(members)
        # rest[i]: the members from i on, once at least one was written (so
        # each starts with a comma). Built back to front as a chain of rules.
        rest = [""] * (n + 1)
        rest[n] = _repeat(f'( "," {ws} {extra} )', 0, None) if extra else ""
        for i in range(n - 1, 0, -1):
            member, needed = members[i]
            item = _seq('","', ws, member)
            item = item if needed else f"( {item} )?"
            if not needed and not rest[i + 1]:
                rest[i] = item
            else:
                rest[i] = self.rules.add(f"{hint}-rest-{i}", _seq(item, rest[i + 1]))

        firsts: list[str] = []
        for i, (member, needed) in enumerate(members):
            firsts.append(_seq(member, rest[i + 1]))
            if needed:
                break
        else:
            if extra:
                firsts.append(_seq(extra, rest[n]))
        any_required = any(needed for _, needed in members)
        body = _seq('"{"', ws, _group(firsts), ws, '"}"') if firsts else ""
        alts = [] if any_required else [f'"{{" {ws} "}}"']
        if body:
            alts.append(body)
        return " | ".join(alts)

    def visit_array(self, schema: Mapping[str, Any], hint: str) -> str:
        ws = self.rules.primitive("ws")
        min_items = _count(schema, "minItems") or 0
        max_items = _count(schema, "maxItems")
        if max_items is not None and max_items < min_items:
            raise GrammarError(f"array at {hint!r} has maxItems below minItems")
        prefix = schema.get("prefixItems")
        items = schema.get("items")
        rest_schema: object = items
        if isinstance(items, list):  # draft 4-7 tuple form
            prefix, rest_schema = items, schema.get("additionalItems")
        if prefix is not None and not isinstance(prefix, list):
            raise GrammarError(f"'prefixItems' at {hint!r} must be a list of schemas")
        prefix = list(prefix or [])
        if max_items is not None:
            prefix = prefix[:max_items]
        fixed = [self.convert(sub, f"{hint}-{i}") for i, sub in enumerate(prefix)]
        if rest_schema is False:
            rest_rule = None
        elif rest_schema is None or rest_schema is True:
            rest_rule = self.rules.primitive("json-value")
        else:
            rest_rule = self.convert(rest_schema, f"{hint}-item")
        lo = max(min_items - len(fixed), 0)
        hi = None if max_items is None else max_items - len(fixed)
        if rest_rule is None:
            if min_items > len(fixed):
                raise GrammarError(
                    f"array at {hint!r} needs {min_items} items but allows {len(fixed)}"
                )
            hi = 0
        if lo > _MAX_BOUNDED_REPEAT:
            raise GrammarError(f"minItems {min_items} at {hint!r} is too large for a grammar")
        if hi is not None and hi > _MAX_BOUNDED_REPEAT:
            hi = None  # not enforced; documented

        sep = f'"," {ws}'
        if fixed:
            head = f" {sep} ".join(fixed)
            tail = _repeat(f"( {sep} {rest_rule} )", lo, hi) if rest_rule and hi != 0 else ""
            return _seq('"["', ws, head, tail, ws, '"]"')
        if hi == 0:
            return _seq('"["', ws, '"]"')
        assert rest_rule is not None
        first_lo = max(lo - 1, 0)
        more = _repeat(f"( {sep} {rest_rule} )", first_lo, None if hi is None else hi - 1)
        filled = _seq('"["', ws, rest_rule, more, ws, '"]"')
        if lo == 0:
            return _seq('"["', ws, '"]"') + " | " + filled
        return filled

    def visit_string(self, schema: Mapping[str, Any], hint: str) -> str:
        fmt = schema.get("format")
        lo = _count(schema, "minLength") or 0
        hi = _count(schema, "maxLength")
        if hi is not None and hi < lo:
            raise GrammarError(f"string at {hint!r} has maxLength below minLength")
        if fmt is not None:
            rule = self.format_rule(fmt, lo, hi, hint)
            if rule is not None:
                return _seq('"\\""', self.rules.primitive(rule), '"\\""')
        if lo == 0 and hi is None:
            return self.rules.primitive("json-string")
        if lo > _MAX_BOUNDED_REPEAT:
            raise GrammarError(f"minLength {lo} at {hint!r} is too large for a grammar")
        if hi is not None and hi > _MAX_BOUNDED_REPEAT:
            hi = None  # not enforced; documented
        char = self.rules.primitive("json-char")
        return _seq('"\\""', _repeat(char, lo, hi), '"\\""')

    def format_rule(self, fmt: object, lo: int, hi: int | None, hint: str) -> str | None:
        """The primitive rule for a string ``format`` (None: write a plain string).

        Strict conversion refuses a format it has no rule for (JSON Schema
        treats formats as annotations, but a validator with a format checker
        does not) and a format whose lengths only partly fit minLength /
        maxLength; lenient conversion drops the format, resp. the lengths.
        """
        if not isinstance(fmt, str):
            if self.strict:
                raise GrammarError(f"'format' at {hint!r} must be a string, got {fmt!r}")
            return None
        rule = _FORMAT_RULES.get(fmt)
        if rule is None:
            if self.strict:
                raise GrammarError(
                    f"'format' {fmt!r} at {hint!r} is not supported (supported: "
                    f"{', '.join(sorted(_FORMAT_RULES))}); remove it or convert with "
                    "strict=False to ignore it"
                )
            return None
        f_lo, f_hi = _FORMAT_LENGTHS[fmt]
        if (hi is not None and hi < f_lo) or (f_hi is not None and f_hi < lo):
            raise GrammarError(
                f"string at {hint!r}: no '{fmt}' value has a length in the "
                "minLength..maxLength range"
            )
        fits = lo <= f_lo and (hi is None or (f_hi is not None and f_hi <= hi))
        if not fits and self.strict:
            raise GrammarError(
                f"string at {hint!r} combines 'format' {fmt!r} with minLength / maxLength "
                "that only some of its values meet, which a grammar here cannot enforce; "
                "convert with strict=False to keep only the format"
            )
        return rule

    def visit_number(self, schema: Mapping[str, Any], integer: bool) -> str:
        lo: Decimal | None = None
        hi: Decimal | None = None
        lo_strict = hi_strict = False
        if "minimum" in schema:
            lo = _decimal(schema["minimum"], "minimum")
        if "maximum" in schema:
            hi = _decimal(schema["maximum"], "maximum")
        ex_lo, ex_hi = schema.get("exclusiveMinimum"), schema.get("exclusiveMaximum")
        if ex_lo is True:  # draft 4: a flag on "minimum"
            lo_strict = lo is not None
        elif ex_lo is not None and ex_lo is not False:
            bound = _decimal(ex_lo, "exclusiveMinimum")
            if lo is None or bound >= lo:
                lo, lo_strict = bound, True
        if ex_hi is True:
            hi_strict = hi is not None
        elif ex_hi is not None and ex_hi is not False:
            bound = _decimal(ex_hi, "exclusiveMaximum")
            if hi is None or bound <= hi:
                hi, hi_strict = bound, True
        if lo is None and hi is None:
            return self.rules.primitive("json-int" if integer else "json-number")
        return _number_range(lo, lo_strict, hi, hi_strict, integer)


_ALL_KINDS: Final[frozenset[str]] = frozenset(
    {"null", "boolean", "number", "string", "array", "object"}
)


def _kind_of(value: object) -> str:
    """The JSON type of a value, integers counted as numbers."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _canonical(value: object) -> object:
    """A hashable key equal for JSON-equal values (1 == 1.0, true != 1)."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return (_kind_of(value), value)
    if isinstance(value, (int, float)):
        try:
            return ("number", Decimal(value) if isinstance(value, int) else Decimal(str(value)))
        except InvalidOperation:  # pragma: no cover - str(float) always parses
            return ("number", str(value))
    if isinstance(value, list):
        return ("array", tuple(_canonical(v) for v in value))
    if isinstance(value, Mapping):
        return ("object", frozenset((str(k), _canonical(v)) for k, v in value.items()))
    return ("other", repr(value))


def _json_type_matches(value: object, kinds: set[str]) -> bool:
    if value is None:
        return "null" in kinds
    if isinstance(value, bool):
        return "boolean" in kinds
    if isinstance(value, int):
        return bool(kinds & {"integer", "number"})
    if isinstance(value, float):
        return "number" in kinds or ("integer" in kinds and value.is_integer())
    if isinstance(value, str):
        return "string" in kinds
    if isinstance(value, list):
        return "array" in kinds
    return "object" in kinds


def json_schema_to_gbnf(schema: Mapping[str, Any] | bool, *, strict: bool = True) -> str:
    """Convert a JSON schema into a GBNF grammar; every sentence is a valid instance.

    The grammar produces compact-or-lightly-spaced JSON: between tokens it
    allows nothing, one space, or a newline plus up to 20 spaces/tabs.

    Supported: ``type`` (a name or a list), ``enum``, ``const``, ``anyOf``,
    ``oneOf`` (see below), ``allOf`` (merged when the parts do not
    conflict), local ``$ref`` (``#``, ``#/$defs/...``, ``#/definitions/...``,
    any JSON pointer; recursion works), ``nullable`` (OpenAPI), objects
    (``properties``, ``required``, ``additionalProperties``), arrays
    (``items``, ``prefixItems`` / tuple ``items``, ``additionalItems``,
    ``minItems``, ``maxItems``), strings (``minLength``, ``maxLength``,
    ``format``: see below), numbers and integers (``minimum``, ``maximum``,
    ``exclusiveMinimum``, ``exclusiveMaximum``, exact for any decimal bound).

    Output is meant to validate with a Draft 2020-12 validator *with* its
    format checker. Hence:

    - ``oneOf`` is written as a union only when the branches are provably
      exclusive: pairwise disjoint JSON types (integer counts as number),
      const / enum branches with no value in common, or object branches
      whose required property has a const / enum no other branch's value
      for it shares. Otherwise it is refused (use ``anyOf``).
    - ``format`` (on strings) is one of date, time, date-time (RFC 3339,
      real calendar dates, years 0001-9999, seconds 00-59), uuid, ipv4
      (no leading zeros), email / idn-email (plain ASCII ``atom.atom@label.label``).
      Any other format is refused; so is a format combined with minLength /
      maxLength that only some of its values meet.
    - Strings hold Unicode scalar values only: no raw surrogates or code
      points past U+10FFFF, and a ``\\u`` escape names either a
      non-surrogate or a whole surrogate pair (which counts as one
      character for minLength / maxLength).

    Choices that narrow the output (it stays valid, but not every valid
    instance can be produced):

    - Properties come in declared order; optional ones may be left out.
    - An object with ``properties`` and no ``additionalProperties`` is
      generated closed (no extra keys). ``additionalProperties: true`` or a
      schema allows extra keys, whose names are not checked against the
      declared ones.
    - ``prefixItems`` entries are always all present.
    - Numbers have at most 19 integral and 16 fraction digits and a 4-digit
      exponent; a bounded number is written without exponent; integers are
      written without fraction or exponent.
    - ``enum`` / ``const`` values are written as compact JSON
      (``ensure_ascii=False``).

    Not enforced: ``maxLength`` / ``maxItems`` above 1000 (the upper bound
    is dropped).

    Ignored as annotations: title, description, default, examples,
    ``$schema``, ``$id``, ``$comment``, deprecated, readOnly, writeOnly,
    content* keywords, and unknown keywords.

    Refused with :class:`GrammarError` (they change which values are valid
    and a grammar cannot express them here): pattern, patternProperties,
    propertyNames, min/maxProperties, dependentRequired / dependentSchemas /
    dependencies, uniqueItems, contains / min/maxContains, multipleOf, not,
    if / then / else, unevaluated*, dynamic refs, remote ``$ref``, and the
    ``oneOf`` / ``format`` cases above. With ``strict=False`` those keywords
    are skipped instead (an unprovable ``oneOf`` becomes a union, an
    unknown format a plain string, a format keeps its grammar and drops the
    lengths), and the grammar is looser than the schema: validate the
    result afterwards.
    """
    if not isinstance(schema, (Mapping, bool)):
        raise GrammarError(
            f"schema must be a JSON object (dict) or a bool, got {type(schema).__name__}"
        )
    rules = _RuleSet()
    converter = _SchemaConverter(rules, schema, strict=strict, prefix="")
    name = rules.reserve("root")
    rules.define(name, converter.visit(schema, "root"))
    return validate_grammar(rules.render())


def json_value_grammar() -> str:
    """A grammar for any single JSON value (object, array, string, number, ...)."""
    rules = _RuleSet()
    rules.add("root", rules.primitive("json-value"))
    return rules.render()


def _json_object_grammar() -> str:
    rules = _RuleSet()
    rules.add("root", rules.primitive("json-object"))
    return rules.render()


#: Grammar for ``response_format={"type": "json_object"}``: any JSON object.
JSON_OBJECT_GBNF: Final[str] = _json_object_grammar()


def response_format_to_grammar(response_format: Mapping[str, Any] | None) -> str | None:
    """Map an OpenAI ``response_format`` to a grammar (None: unconstrained text).

    - ``None`` or ``{"type": "text"}`` -> ``None``
    - ``{"type": "json_object"}`` -> :data:`JSON_OBJECT_GBNF`; an optional
      ``"schema"`` key (llama.cpp server extension) is converted instead.
    - ``{"type": "json_schema", "json_schema": {"name": ..., "schema": {...},
      "strict": ...}}`` -> :func:`json_schema_to_gbnf`; ``"strict": false``
      converts leniently (unsupported keywords skipped, see there).

    A malformed mapping raises :class:`InvalidInputError`; a schema the
    converter cannot express raises :class:`GrammarError` (a subclass).
    """
    if response_format is None:
        return None
    if not isinstance(response_format, Mapping):
        raise InvalidInputError(
            f"response_format must be an object, got {type(response_format).__name__}"
        )
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        schema = response_format.get("schema")
        if schema is None:
            return JSON_OBJECT_GBNF
        if not isinstance(schema, (Mapping, bool)):
            raise InvalidInputError("response_format.schema must be a JSON schema object")
        return json_schema_to_gbnf(schema)
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, Mapping):
            raise InvalidInputError(
                "response_format.json_schema must be an object with a 'schema' key"
            )
        name = spec.get("name")
        if name is not None and (not isinstance(name, str) or not name):
            raise InvalidInputError("response_format.json_schema.name must be a non-empty string")
        schema = spec.get("schema")
        if schema is None:
            raise InvalidInputError("response_format.json_schema.schema is missing")
        if not isinstance(schema, (Mapping, bool)):
            raise InvalidInputError(
                "response_format.json_schema.schema must be a JSON schema object"
            )
        strict_flag = spec.get("strict")
        if strict_flag is not None and not isinstance(strict_flag, bool):
            raise InvalidInputError("response_format.json_schema.strict must be a bool")
        return json_schema_to_gbnf(schema, strict=strict_flag is not False)
    raise InvalidInputError(
        f"response_format.type must be 'text', 'json_object' or 'json_schema', got {kind!r}"
    )

