"""Test utilities: decide whether a string is a sentence of a GBNF grammar.

Two independent recognisers:

- :class:`GbnfMatcher`, pure Python: parses the GBNF dialect llama.cpp reads
  (literals, character classes with ranges and negation, ``.``, groups,
  ``*`` ``+`` ``?`` ``{m}`` ``{m,}`` ``{m,n}``, comments) and runs an Earley
  recogniser over code points. Earley handles any context-free grammar
  (ambiguity, nullable rules) without backtracking blow-ups.
- :func:`build_llama_oracle`, llama.cpp's own matcher: a tiny C++ program
  compiled at test time against the installed ``libllama`` that feeds code
  points to ``llama_grammar_accept``. It needs a C++ compiler and the
  llama.cpp headers; tests skip it when either is missing. Agreement of the
  two recognisers is itself checked, so a bug in the Python one shows up.
"""

from __future__ import annotations

import shutil
import subprocess
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

# A terminal is a predicate on one code point; a nonterminal is a rule name.
Terminal = Callable[[int], bool]


class GbnfSyntaxError(ValueError):
    """The matcher could not parse the grammar text."""


def _is_word(c: str) -> bool:
    return c.isascii() and (c.isalnum() or c == "-")


@dataclass(frozen=True)
class _CharSet:
    negated: bool
    ranges: tuple[tuple[int, int], ...]

    def __call__(self, code: int) -> bool:
        inside = any(lo <= code <= hi for lo, hi in self.ranges)
        return inside != self.negated


class _Parser:
    def __init__(self, text: str) -> None:
        self.s = text
        self.n = len(text)
        self.rules: dict[str, list[list[object]]] = {}
        self.counter = 0

    def fresh(self, base: str) -> str:
        self.counter += 1
        return f"{base}~{self.counter}"

    def space(self, pos: int, newline_ok: bool) -> int:
        while pos < self.n:
            c = self.s[pos]
            if c == "#":
                while pos < self.n and self.s[pos] not in "\r\n":
                    pos += 1
            elif c in " \t" or (newline_ok and c in "\r\n"):
                pos += 1
            else:
                break
        return pos

    def char(self, pos: int) -> tuple[int, int]:
        s = self.s
        if s[pos] != "\\":
            return ord(s[pos]), pos + 1
        kind = s[pos + 1]
        width = {"x": 2, "u": 4, "U": 8}.get(kind)
        if width:
            return int(s[pos + 2 : pos + 2 + width], 16), pos + 2 + width
        simple = {"t": "\t", "r": "\r", "n": "\n", "\\": "\\", '"': '"', "[": "[", "]": "]", "-": "-"}
        if kind not in simple:
            raise GbnfSyntaxError(f"bad escape at {pos}")
        return ord(simple[kind]), pos + 2

    def parse(self) -> dict[str, list[list[object]]]:
        pos = self.space(0, True)
        while pos < self.n:
            end = pos
            while end < self.n and _is_word(self.s[end]):
                end += 1
            if end == pos:
                raise GbnfSyntaxError(f"expected rule name at {pos}: {self.s[pos:pos + 20]!r}")
            name = self.s[pos:end]
            pos = self.space(end, False)
            if not self.s.startswith("::=", pos):
                raise GbnfSyntaxError(f"expected ::= at {pos}")
            alts, pos = self.alternates(self.space(pos + 3, True), name, False)
            self.rules[name] = alts
            if pos < self.n and self.s[pos] not in "\r\n":
                raise GbnfSyntaxError(f"unexpected {self.s[pos]!r} at {pos}")
            pos = self.space(pos, True)
        for alts in self.rules.values():
            for seq in alts:
                for sym in seq:
                    if isinstance(sym, str) and sym not in self.rules:
                        raise GbnfSyntaxError(f"undefined rule {sym!r}")
        return self.rules

    def alternates(self, pos: int, name: str, nested: bool) -> tuple[list[list[object]], int]:
        alts = []
        seq, pos = self.sequence(pos, name, nested)
        alts.append(seq)
        while pos < self.n and self.s[pos] == "|":
            seq, pos = self.sequence(self.space(pos + 1, True), name, nested)
            alts.append(seq)
        return alts, pos

    def sequence(self, pos: int, name: str, nested: bool) -> tuple[list[object], int]:
        seq: list[object] = []
        last: list[object] = []  # the symbols of the last item, for repetition
        s = self.s
        while pos < self.n:
            c = s[pos]
            if c == '"':
                pos += 1
                last = []
                while s[pos] != '"':
                    code, pos = self.char(pos)
                    last.append(_CharSet(False, ((code, code),)))
                seq.extend(last)
                # A multi-character literal repeats as a whole: wrap it.
                if len(last) > 1:
                    sub = self.fresh(name)
                    self.rules[sub] = [list(last)]
                    del seq[-len(last):]
                    seq.append(sub)
                    last = [sub]
                pos = self.space(pos + 1, nested)
            elif c == "[":
                pos += 1
                negated = s[pos] == "^"
                if negated:
                    pos += 1
                ranges = []
                while s[pos] != "]":
                    lo, pos = self.char(pos)
                    hi = lo
                    if s[pos] == "-" and s[pos + 1] != "]":
                        hi, pos = self.char(pos + 1)
                    ranges.append((lo, hi))
                last = [_CharSet(negated, tuple(ranges))]
                seq.extend(last)
                pos = self.space(pos + 1, nested)
            elif c == ".":
                last = [_CharSet(True, ())]
                seq.extend(last)
                pos = self.space(pos + 1, nested)
            elif _is_word(c):
                end = pos
                while end < self.n and _is_word(s[end]):
                    end += 1
                last = [s[pos:end]]
                seq.extend(last)
                pos = self.space(end, nested)
            elif c == "(":
                alts, pos = self.alternates(self.space(pos + 1, True), name, True)
                if pos >= self.n or s[pos] != ")":
                    raise GbnfSyntaxError(f"expected ) at {pos}")
                sub = self.fresh(name)
                self.rules[sub] = alts
                last = [sub]
                seq.extend(last)
                pos = self.space(pos + 1, nested)
            elif c in "*+?{":
                if not last:
                    raise GbnfSyntaxError(f"nothing to repeat at {pos}")
                if c == "{":
                    close = s.index("}", pos)
                    body = s[pos + 1 : close].replace(" ", "")
                    if "," in body:
                        lo_s, hi_s = body.split(",")
                        low, high = int(lo_s), (int(hi_s) if hi_s else None)
                    else:
                        low = high = int(body)
                    pos = close + 1
                else:
                    low, high = {"*": (0, None), "+": (1, None), "?": (0, 1)}[c]
                    pos += 1
                del seq[-len(last):]
                rep = self.repeat(last, low, high, name)
                seq.extend(rep)
                last = rep if len(rep) == 1 else []
                if len(rep) != 1:
                    sub = self.fresh(name)
                    self.rules[sub] = [rep]
                    del seq[-len(rep):]
                    seq.append(sub)
                    last = [sub]
                pos = self.space(pos, nested)
            elif c in "<!":
                raise GbnfSyntaxError("token references are not supported by this matcher")
            else:
                break
        return seq, pos

    def repeat(self, item: list[object], low: int, high: int | None, name: str) -> list[object]:
        out: list[object] = []
        for _ in range(low):
            out.extend(item)
        if high is None:
            star = self.fresh(name)
            self.rules[star] = [[*item, star], []]
            out.append(star)
        else:
            tail: str | None = None
            for _ in range(high - low):
                opt = self.fresh(name)
                self.rules[opt] = [[*item, tail] if tail else list(item), []]
                tail = opt
            if tail:
                out.append(tail)
        return out


class GbnfMatcher:
    """Earley recogniser for a GBNF grammar (whole-string match from ``root``)."""

    def __init__(self, grammar: str, root: str = "root") -> None:
        rules = _Parser(grammar).parse()
        if root not in rules:
            raise GbnfSyntaxError(f"no {root!r} rule")
        self.root = root
        self.prods: list[tuple[str, tuple[object, ...]]] = []
        self.by_lhs: dict[str, list[int]] = defaultdict(list)
        for lhs, alts in rules.items():
            for seq in alts:
                self.by_lhs[lhs].append(len(self.prods))
                self.prods.append((lhs, tuple(seq)))
        self.nullable = self._nullable()

    def _nullable(self) -> set[str]:
        nullable: set[str] = set()
        changed = True
        while changed:
            changed = False
            for lhs, rhs in self.prods:
                if lhs not in nullable and all(isinstance(s, str) and s in nullable for s in rhs):
                    nullable.add(lhs)
                    changed = True
        return nullable

    def failure_position(self, text: str) -> int | None:
        """None when ``text`` is a sentence; else the index where it went wrong
        (``len(text)`` when the text is a valid but incomplete prefix)."""
        codes = [ord(c) for c in text]
        n = len(codes)
        prods, by_lhs, nullable = self.prods, self.by_lhs, self.nullable
        current: set[tuple[int, int, int]] = set()
        waiting: list[dict[str, list[tuple[int, int, int]]]] = []
        agenda: list[tuple[int, int, int]] = []

        def add(item: tuple[int, int, int]) -> None:
            if item not in current:
                current.add(item)
                agenda.append(item)

        for p in by_lhs[self.root]:
            add((p, 0, 0))
        for i in range(n + 1):
            waiting.append(defaultdict(list))
            here = waiting[i]
            nxt: set[tuple[int, int, int]] = set()
            while agenda:
                p, d, o = agenda.pop()
                lhs, rhs = prods[p]
                if d == len(rhs):
                    for p2, d2, o2 in list(waiting[o][lhs]):
                        add((p2, d2 + 1, o2))
                    continue
                sym = rhs[d]
                if isinstance(sym, str):
                    here[sym].append((p, d, o))
                    for p3 in by_lhs[sym]:
                        add((p3, 0, i))
                    if sym in nullable:  # Aycock-Horspool: skip over empty derivations
                        add((p, d + 1, o))
                elif i < n and sym(codes[i]):  # type: ignore[operator]
                    nxt.add((p, d + 1, o))
            if i == n:
                done = any(
                    prods[p][0] == self.root and d == len(prods[p][1]) and o == 0
                    for p, d, o in current
                )
                return None if done else n
            if not nxt:
                return i
            current = set(nxt)
            agenda = list(nxt)
        return None  # pragma: no cover

    def matches(self, text: str) -> bool:
        return self.failure_position(text) is None


# ---------------------------------------------------------------------------
# llama.cpp oracle
# ---------------------------------------------------------------------------

_ORACLE_SOURCE = r"""
#include "llama-grammar.h"
#include <cstdio>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>

// usage: oracle GRAMMAR_FILE < lines ; each line is space-separated decimal
// code points (an empty line is the empty string); prints 1 (sentence) or 0.
int main(int argc, char ** argv) {
    if (argc != 2) { return 2; }
    std::ifstream in(argv[1]);
    std::stringstream buf; buf << in.rdbuf();
    std::string text = buf.str();
    llama_grammar * g = llama_grammar_init_impl(nullptr, text.c_str(), "root", false, nullptr, 0, nullptr, 0);
    if (g == nullptr) { std::printf("PARSE-ERROR\n"); return 3; }
    const llama_grammar_stacks initial = llama_grammar_get_stacks(g);
    std::string line;
    while (std::getline(std::cin, line)) {
        llama_grammar_get_stacks(g) = initial;
        std::istringstream cps(line);
        unsigned long cp;
        bool alive = true;
        while (alive && (cps >> cp)) {
            llama_grammar_accept(g, (uint32_t) cp);
            if (llama_grammar_get_stacks(g).empty()) { alive = false; }
        }
        bool ok = false;
        if (alive) {
            for (const auto & st : llama_grammar_get_stacks(g)) { if (st.empty()) { ok = true; break; } }
        }
        std::printf("%d\n", ok ? 1 : 0);
    }
    llama_grammar_free_impl(g);
    return 0;
}
"""


class LlamaOracle:
    """Runs the compiled oracle program: llama.cpp's verdict per string."""

    def __init__(self, executable: Path, workdir: Path) -> None:
        self.executable = executable
        self.workdir = workdir
        self.count = 0

    def matches_all(self, grammar: str, texts: Sequence[str]) -> list[bool]:
        self.count += 1
        path = self.workdir / f"grammar-{self.count}.gbnf"
        path.write_text(grammar, encoding="utf-8")
        payload = "".join(" ".join(str(ord(c)) for c in t) + "\n" for t in texts)
        proc = subprocess.run(
            [str(self.executable), str(path)],
            input=payload,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"oracle failed ({proc.returncode}): {proc.stdout}{proc.stderr[-2000:]}")
        verdicts = proc.stdout.split()
        assert len(verdicts) == len(texts), (verdicts, texts)
        return [v == "1" for v in verdicts]


def build_llama_oracle(llama_cpp_dir: Path, workdir: Path) -> LlamaOracle | str:
    """Compile the oracle; return it, or a reason string when it cannot be built."""
    compiler = shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if compiler is None:
        return "no C++ compiler"
    try:
        import xybrid._native as native
    except ImportError as exc:  # pragma: no cover
        return f"xybrid._native not importable: {exc}"
    libdir = Path(native.__file__).resolve().parent
    if not (libdir / "libllama.so").exists():
        return f"no libllama.so in {libdir}"
    headers = [llama_cpp_dir / "src", llama_cpp_dir / "include", llama_cpp_dir / "ggml" / "include"]
    if not all(h.is_dir() for h in headers):
        return "llama.cpp headers not found"
    workdir.mkdir(parents=True, exist_ok=True)
    source = workdir / "oracle.cpp"
    exe = workdir / "oracle"
    if exe.exists() and source.exists() and source.read_text() == _ORACLE_SOURCE:
        return LlamaOracle(exe, workdir)  # built earlier in this session
    source.write_text(_ORACLE_SOURCE)
    cmd = [
        compiler, "-std=c++17", "-O1", "-o", str(exe), str(source),
        *(f"-I{h}" for h in headers),
        f"-L{libdir}", "-l:libllama.so", f"-Wl,-rpath,{libdir}",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        return "oracle did not compile: " + proc.stderr[-1500:]
    return LlamaOracle(exe, workdir)


def check_instances(
    matcher: GbnfMatcher, valid: Iterable[str], invalid: Iterable[str]
) -> list[str]:
    """Messages for every valid text rejected and invalid text accepted."""
    problems = []
    for text in valid:
        where = matcher.failure_position(text)
        if where is not None:
            problems.append(f"rejected valid {text!r} at index {where}")
    for text in invalid:
        if matcher.matches(text):
            problems.append(f"accepted invalid {text!r}")
    return problems
