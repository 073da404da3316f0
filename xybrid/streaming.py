"""Text post-processing for chat replies: stop markers and reasoning blocks.

Chat models sometimes print an end-of-turn marker as plain text instead of
producing the end-of-generation token, or start writing the next user turn; and
reasoning models wrap their chain of thought in ``<think>...</think>``. Two
layers deal with that:

- :class:`StreamingTextFilter` works on the stream as it arrives: it releases
  text as soon as it can no longer be part of a stop marker or a think tag,
  hides reasoning, and stops for good at the first stop marker.
- :func:`truncate_at_first_stop`, :func:`trim_partial_stop_suffix` and
  :func:`strip_thinking_tags` clean up a finished reply in one go.

All matching is on Python ``str`` (code points); incomplete UTF-8 never gets
here because the native engine holds back partial characters.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final, Literal

from xybrid.errors import InvalidInputError, XybridError

__all__ = [
    "CHAT_STOP_PATTERNS",
    "CHAT_STOP_PATTERNS_BROKEN",
    "THINK_TAGS",
    "merge_stop_patterns",
    "truncate_at_first_stop",
    "trim_partial_stop_suffix",
    "strip_thinking_tags",
    "StreamingTextFilter",
]

#: Markers that end a chat reply when a model prints them as text. Each is the
#: end (or the start of the next turn) of a widely used chat format; a reply
#: never legitimately contains them, so cutting there is always right.
CHAT_STOP_PATTERNS: Final[tuple[str, ...]] = (
    "<|im_end|>",  # ChatML end of turn (Qwen, SmolLM, Yi, many fine-tunes)
    "<|im_start|>",  # ChatML: the model is opening another turn by itself
    "<end_of_turn>",  # Gemma end of turn
    "<start_of_turn>",  # Gemma: the model is opening another turn
    "<|eot_id|>",  # Llama 3 end of turn
    "<|start_header_id|>",  # Llama 3: the model is writing another turn's header
    "<|end_of_text|>",  # Llama 3 end of document
    "<|end|>",  # Phi-3 end of turn
    "<|endoftext|>",  # GPT-2 style end of document (Phi, Qwen base models)
    "</s>",  # Llama 2 / Mistral end of sequence
    "[INST]",  # Llama 2 / Mistral: the model is writing the next user turn
    "<eos>",  # Gemma end of sequence
    "<｜end▁of▁sentence｜>",  # DeepSeek end of sequence (full-width bars)
    "<|END_OF_TURN_TOKEN|>",  # Command-R end of turn
)

#: The same markers with the leading ``<`` split off by the tokenizer, so the
#: text shows only the rest. Too likely to occur in ordinary prose to cut a
#: stream on, they are used only when cleaning up a finished reply.
CHAT_STOP_PATTERNS_BROKEN: Final[tuple[str, ...]] = (
    "|im_end|>",
    "|im_start|>",
    "end_of_turn>",
    "start_of_turn>",
    "|eot_id|>",
    "|start_header_id|>",
    "|end_of_text|>",
    "|endoftext|>",
)

#: Opening reasoning tag -> the closing tag that ends it.
THINK_TAGS: Final[dict[str, str]] = {
    "<think>": "</think>",
    "<thinking>": "</thinking>",
}
_CLOSE_TAGS: Final[tuple[str, ...]] = tuple(THINK_TAGS.values())


def merge_stop_patterns(user: Iterable[str], extra: Iterable[str]) -> tuple[str, ...]:
    """Caller's patterns first, then ``extra``; duplicates and empty strings dropped.

    Order only matters for readability and logs: matching always cuts at the
    earliest position whatever the order.
    """
    merged: dict[str, None] = {}
    for pattern in (*user, *extra):
        if not isinstance(pattern, str):
            raise InvalidInputError(f"stop patterns must be str, got {pattern!r}")
        if pattern:
            merged.setdefault(pattern)
    return tuple(merged)


def _earliest_match(text: str, patterns: Iterable[str]) -> tuple[int, str] | None:
    best: tuple[int, str] | None = None
    for pattern in patterns:
        if not pattern:
            continue
        index = text.find(pattern)
        if index >= 0 and (best is None or index < best[0]):
            best = (index, pattern)
    return best


def truncate_at_first_stop(text: str, patterns: Iterable[str]) -> tuple[str, bool]:
    """Cut ``text`` where the earliest occurrence of any pattern begins.

    Returns ``(text_before_the_stop, True)``, or ``(text, False)`` when no
    pattern occurs. The position decides, not the order of ``patterns``.
    """
    match = _earliest_match(text, patterns)
    if match is None:
        return text, False
    return text[: match[0]], True


def _is_markup_fragment(fragment: str) -> bool:
    return any(not (ch.isalnum() or ch.isspace()) for ch in fragment)


def trim_partial_stop_suffix(
    text: str, patterns: Iterable[str], *, markup_only: bool = True
) -> tuple[str, bool]:
    """Remove a trailing fragment that is the start of a pattern (``"...<|im_"``).

    Happens when generation hit its token limit in the middle of a marker. The
    longest such fragment is removed. With ``markup_only`` (the default) a
    fragment counts only if it holds a character that is neither alphanumeric
    nor whitespace: a reply ending in ``"e"`` must not lose it just because
    ``"end_of_turn>"`` is among the patterns, while ``"<|im_"``, ``"</"`` or
    ``"[INS"`` are still trimmed. Pass ``markup_only=False`` to trim any
    fragment.
    """
    usable = [p for p in patterns if p]
    longest = max((len(p) for p in usable), default=0)
    for start in range(max(0, len(text) - longest + 1), len(text)):
        fragment = text[start:]
        if markup_only and not _is_markup_fragment(fragment):
            continue
        if any(len(p) > len(fragment) and p.startswith(fragment) for p in usable):
            return text[:start], True
    return text, False


def strip_thinking_tags(text: str) -> str:
    """Remove reasoning from a finished reply.

    Removed, tags included:

    - every ``<think>...</think>`` and ``<thinking>...</thinking>`` block (a
      block ends at the closing tag of its own kind);
    - an unclosed block at the end: from its opening tag to the end of text;
    - a leading block whose opening tag was in the prompt: everything up to
      and including the first closing tag, when no opening tag comes before it.

    Whitespace around removed blocks is kept; callers trim the final text.
    """
    first_close = _earliest_match(text, _CLOSE_TAGS)
    first_open = _earliest_match(text, THINK_TAGS)
    opened_in_prompt = first_close is not None and (
        first_open is None or first_close[0] < first_open[0]
    )
    cleaner = StreamingTextFilter((), strip_thinking=True, starts_in_think=opened_in_prompt)
    return (cleaner.push(text) or "") + (cleaner.finish() or "")


_MarkerKind = Literal["stop", "open", "close"]


class StreamingTextFilter:
    """Decide, chunk by chunk, which generated text is safe to show.

    ``push`` returns the newly releasable text. Text is held back only while a
    suffix of it could still grow into a stop pattern or (with
    ``strip_thinking``) a think tag; everything before that is released at
    once. The result does not depend on how the text was split into chunks.

    Stop patterns: at the first one, everything from it on is dropped,
    ``is_stopped`` turns True and later pushes return None. When patterns
    overlap, the one that starts earliest wins, as in
    :func:`truncate_at_first_stop`.

    Reasoning: with ``strip_thinking`` the content of ``<think>`` /
    ``<thinking>`` blocks is never released; it is collected in ``thinking``.
    ``starts_in_think`` is for prompts whose template already opened the block,
    so the stream begins inside it and the first closing tag (of either kind)
    ends it.

    Stop patterns are honoured inside a reasoning block too: the native engine
    stops on the raw text, reasoning included, so the filter has to agree with
    it. The reasoning up to the pattern is kept in ``thinking``, nothing more is
    released, and :func:`strip_thinking_tags` removes the now unclosed block in
    the final text. If a stop pattern and a tag start at the same position, the
    stop pattern wins.
    """

    def __init__(
        self,
        stop_patterns: Iterable[str],
        strip_thinking: bool = True,
        *,
        starts_in_think: bool = False,
    ) -> None:
        if starts_in_think and not strip_thinking:
            raise InvalidInputError(
                "StreamingTextFilter.starts_in_think needs strip_thinking=True"
            )
        self._stops: tuple[str, ...] = merge_stop_patterns(stop_patterns, ())
        self._strip_thinking = strip_thinking
        self._pending = ""
        # Closing tags that end the current reasoning block; None outside one.
        self._think_closers: tuple[str, ...] | None = _CLOSE_TAGS if starts_in_think else None
        self._emitted = ""
        self._thinking = ""
        self._matched_stop: str | None = None
        self._finished = False
        self._marker_sets: dict[tuple[str, ...] | None, _MarkerSet] = {}

    # -- public state -----------------------------------------------------

    @property
    def stop_patterns(self) -> tuple[str, ...]:
        """The patterns in use, de-duplicated, empty ones removed."""
        return self._stops

    @property
    def is_stopped(self) -> bool:
        """True once a stop pattern has been seen."""
        return self._matched_stop is not None

    @property
    def matched_stop(self) -> str | None:
        """The stop pattern that ended the stream, if any."""
        return self._matched_stop

    @property
    def in_think(self) -> bool:
        """True while the stream is inside a reasoning block."""
        return self._think_closers is not None

    @property
    def cumulative_emitted(self) -> str:
        """All text released so far: the concatenation of every returned piece."""
        return self._emitted

    @property
    def thinking(self) -> str:
        """Reasoning text collected so far (tag contents, tags excluded)."""
        return self._thinking

    # -- feeding ----------------------------------------------------------

    def push(self, chunk: str) -> str | None:
        """Add generated text; return what became safe to show, or None."""
        if not isinstance(chunk, str):
            raise InvalidInputError(f"StreamingTextFilter.push needs a str, got {chunk!r}")
        if self._finished:
            raise XybridError("StreamingTextFilter.push called after finish()")
        if self.is_stopped or not chunk:
            return None
        self._pending += chunk
        return self._release(self._drain(at_end=False))

    def finish(self) -> str | None:
        """End of stream: release held-back text that never became a marker.

        A dangling fragment such as ``"<|im_"`` is real text at this point and
        is returned; the content of an unclosed reasoning block is not (it goes
        to ``thinking``). Calling it again returns None.
        """
        if self._finished:
            return None
        self._finished = True
        if self.is_stopped:
            return None
        return self._release(self._drain(at_end=True))

    # -- internals --------------------------------------------------------

    def _release(self, text: str) -> str | None:
        if not text:
            return None
        self._emitted += text
        return text

    def _markers(self) -> _MarkerSet:
        """Markers that matter in the current mode (built once per mode)."""
        key = self._think_closers
        cached = self._marker_sets.get(key)
        if cached is None:
            markers: list[tuple[str, _MarkerKind]] = [(p, "stop") for p in self._stops]
            if key is not None:
                markers.extend((tag, "close") for tag in key)
            elif self._strip_thinking:
                markers.extend((tag, "open") for tag in THINK_TAGS)
            cached = _MarkerSet(markers)
            self._marker_sets[key] = cached
        return cached

    def _route(self, text: str, out: list[str]) -> None:
        if self._think_closers is not None:
            self._thinking += text
        else:
            out.append(text)

    def _drain(self, *, at_end: bool) -> str:
        """Consume ``_pending`` as far as it can be decided; return released text."""
        out: list[str] = []
        while self._pending:
            pending = self._pending
            markers = self._markers()
            found = _first_complete(pending, markers)
            limit = found[0] if found is not None else len(pending)
            undecided = limit if at_end else _first_partial(pending, markers, limit)
            if found is None or undecided < limit:
                # Nothing to act on yet: release what cannot start a marker.
                self._route(pending[:undecided], out)
                self._pending = pending[undecided:]
                if at_end:
                    self._route(self._pending, out)
                    self._pending = ""
                break
            index, marker, kind = found
            self._route(pending[:index], out)
            self._pending = pending[index + len(marker) :]
            if kind == "stop":
                self._matched_stop = marker
                self._pending = ""
            elif kind == "open":
                self._think_closers = (THINK_TAGS[marker],)
            else:
                self._think_closers = None
        return "".join(out)


class _MarkerSet:
    """The markers of one filter mode, with what the scans need precomputed."""

    __slots__ = ("markers", "longest", "first_chars")

    def __init__(self, markers: list[tuple[str, _MarkerKind]]) -> None:
        self.markers = markers
        self.longest = max((len(m) for m, _ in markers), default=0)
        self.first_chars = frozenset(m[0] for m, _ in markers)


def _first_complete(text: str, markers: _MarkerSet) -> tuple[int, str, _MarkerKind] | None:
    """Earliest complete marker; at equal positions a stop pattern wins."""
    best: tuple[int, str, _MarkerKind] | None = None
    for marker, kind in markers.markers:
        index = text.find(marker)
        if index < 0:
            continue
        if best is None or index < best[0] or (index == best[0] and kind == "stop"):
            best = (index, marker, kind)
    return best


def _first_partial(text: str, markers: _MarkerSet, limit: int) -> int:
    """Earliest position before ``limit`` where the rest of ``text`` is a proper
    prefix of a marker (a marker that may still complete); ``limit`` if none."""
    for start in range(max(0, len(text) - markers.longest + 1), limit):
        if text[start] not in markers.first_chars:
            continue
        tail = text[start:]
        if any(len(m) > len(tail) and m.startswith(tail) for m, _ in markers.markers):
            return start
    return limit
