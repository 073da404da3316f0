"""Turning a conversation into the prompt text a model was trained on.

Two routes lead to a prompt:

* the model's own Hugging-Face-style Jinja chat template (GGUF key
  ``tokenizer.chat_template``), rendered by :class:`JinjaChatTemplate` in a
  sandbox with the same environment ``transformers`` uses, so the text matches
  what the model saw in training;
* three built-in formatters (:class:`ChatFormat`: ChatML, Llama-2, Gemma) for
  models that carry no usable template, chosen by name or inferred from the
  GGUF architecture.

:func:`resolve_chat_template` picks between them; see its docstring for the
rule. A message is anything with ``role`` and ``content`` attributes (such as
``xybrid.types.ChatMessage``) or a mapping with those keys.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Iterable, Mapping
from typing import Any, Protocol

from .errors import InvalidInputError, UnsupportedInputError

__all__ = [
    "ChatFormat",
    "DEFAULT_CHAT_FORMAT",
    "ChatTemplate",
    "BuiltinChatTemplate",
    "JinjaChatTemplate",
    "format_messages",
    "format_for_architecture",
    "is_preformatted",
    "resolve_chat_template",
]


# ---------------------------------------------------------------------------
# Formats
# ---------------------------------------------------------------------------


class ChatFormat(enum.Enum):
    """The built-in prompt formats; the value is the canonical name."""

    CHATML = "chatml"
    """``<|im_start|>role\\ncontent<|im_end|>\\n`` (Qwen, Yi, SmolLM and many more)."""
    LLAMA2 = "llama2"
    """``[INST] <<SYS>>\\nsystem\\n<</SYS>>\\n\\nuser [/INST] assistant`` (Llama 2 chat)."""
    GEMMA = "gemma"
    """``<start_of_turn>role\\ncontent<end_of_turn>\\n``, with ``model`` for the assistant."""

    @classmethod
    def from_name(cls, name: str) -> ChatFormat:
        """Parse a user-supplied format name.

        Case is ignored, and so are ``-``, ``_`` and spaces, which makes
        ``ChatML``, ``chat_ml``, ``chat-ml``, ``Llama-2``, ``llama_2``,
        ``gemma-3`` and ``gemma3n`` all valid. ``llama`` means Llama 2, and every
        Gemma generation up to 3n shares the ``<start_of_turn>`` syntax.
        Unknown names raise :class:`InvalidInputError` listing what is accepted,
        so a typo in a config file fails loudly instead of silently using the
        default.
        """
        if not isinstance(name, str):
            raise InvalidInputError(
                f"chat format name must be a str, got {type(name).__name__}"
            )
        key = "".join(ch for ch in name.lower() if ch not in "-_ \t")
        found = _FORMAT_ALIASES.get(key)
        if found is None:
            accepted = ", ".join(sorted(_FORMAT_SPELLINGS))
            raise InvalidInputError(
                f"unknown chat format {name!r}; expected one of: {accepted} "
                "(case-insensitive; '-', '_' and spaces are ignored)"
            )
        return found


_FORMAT_ALIASES: dict[str, ChatFormat] = {
    "chatml": ChatFormat.CHATML,
    "llama": ChatFormat.LLAMA2,
    "llama2": ChatFormat.LLAMA2,
    "gemma": ChatFormat.GEMMA,
    "gemma2": ChatFormat.GEMMA,
    "gemma3": ChatFormat.GEMMA,
    "gemma3n": ChatFormat.GEMMA,
}
# The spellings shown in error messages.
_FORMAT_SPELLINGS = ("chatml", "llama", "llama2", "gemma", "gemma2", "gemma3", "gemma3n")

DEFAULT_CHAT_FORMAT = ChatFormat.CHATML
"""The format used when nothing else is known: ChatML, the most widespread one."""


def format_for_architecture(arch: str | None) -> ChatFormat:
    """Guess the built-in format for a GGUF ``general.architecture`` value.

    This only matters for a model that ships no chat template, so the guess
    aims at the models that actually reach it:

    * ``gemma``, ``gemma2``, ``gemma3``, ``gemma3n``, ``gemma-embedding`` and any
      other name starting with ``gemma`` -> GEMMA. (Gemma 4 switched to a
      different turn syntax; its GGUFs always carry their own template, and the
      Gemma roles are still the nearest fallback.)
    * ``llama`` exactly, and ``mistral*`` -> LLAMA2. Llama-3 instruct GGUFs carry
      their template, so a template-less ``llama`` file is a base model or an
      older Llama-2 conversion (which predates template metadata); Mistral
      instruct models use the same ``[INST] ... [/INST]`` turns.
    * everything else (``qwen2``, ``qwen3``, ``phi3``, ``llama4``, unknown,
      empty or ``None``) -> ChatML, the default.

    Matching ignores case and surrounding whitespace.
    """
    if arch is None:
        return DEFAULT_CHAT_FORMAT
    if not isinstance(arch, str):
        raise InvalidInputError(f"architecture must be a str, got {type(arch).__name__}")
    key = arch.strip().lower()
    if key.startswith("gemma"):
        return ChatFormat.GEMMA
    if key == "llama" or key.startswith("mistral"):
        return ChatFormat.LLAMA2
    return DEFAULT_CHAT_FORMAT


# ---------------------------------------------------------------------------
# Double-formatting guard
# ---------------------------------------------------------------------------

# The text that opens the first turn of a prompt in each format.
_OPENING_MARKERS: dict[ChatFormat, str] = {
    ChatFormat.CHATML: "<|im_start|>",
    ChatFormat.LLAMA2: "[INST]",
    ChatFormat.GEMMA: "<start_of_turn>",
}
# Other widely used first-turn openers, recognised only when no format is named:
# Llama 3 headers and Gemma 4 turns.
_OTHER_OPENING_MARKERS = ("<|start_header_id|>", "<|turn>")
# Beginning-of-sequence tokens a rendered prompt may start with.
_BOS_TEXTS = ("<|begin_of_text|>", "<|startoftext|>", "<bos>", "<s>")


def is_preformatted(text: str, fmt: ChatFormat | None = None) -> bool:
    """Tell whether ``text`` is already a rendered chat prompt.

    Rule: after leading whitespace and at most one beginning-of-sequence text
    (``<s>``, ``<bos>``, ``<|begin_of_text|>``, ``<|startoftext|>``), the text
    starts with the opening marker of a turn: ``<|im_start|>`` for ChatML,
    ``[INST]`` for Llama-2, ``<start_of_turn>`` for Gemma. With ``fmt`` given only
    that format's marker counts; with ``fmt=None`` any of the three does, and so
    do Llama-3 (``<|start_header_id|>``) and Gemma-4 (``<|turn>``) openers.

    Only the start is checked, so a question that merely mentions a marker
    ("what does <|im_start|> mean?") is still treated as plain text.
    """
    if not isinstance(text, str):
        raise InvalidInputError(f"text must be a str, got {type(text).__name__}")
    if fmt is not None and not isinstance(fmt, ChatFormat):
        raise InvalidInputError(f"fmt must be a ChatFormat or None, got {fmt!r}")
    head = text.lstrip()
    for bos in _BOS_TEXTS:
        if head.startswith(bos):
            head = head[len(bos) :].lstrip()
            break
    if fmt is not None:
        markers: tuple[str, ...] = (_OPENING_MARKERS[fmt],)
    else:
        markers = (*_OPENING_MARKERS.values(), *_OTHER_OPENING_MARKERS)
    return head.startswith(markers)


# ---------------------------------------------------------------------------
# Reading duck-typed messages
# ---------------------------------------------------------------------------

_ROLES = ("system", "user", "assistant", "tool")
_MISSING = object()


def _get(message: object, key: str) -> object:
    """Read ``key`` from a mapping or an attribute of an object; ``_MISSING`` if absent."""
    if isinstance(message, Mapping):
        return message.get(key, _MISSING)
    return getattr(message, key, _MISSING)


def _check_message_shape(message: object, index: int) -> None:
    if isinstance(message, Mapping):
        return
    if isinstance(message, (str, bytes)) or not (
        hasattr(message, "role") or hasattr(message, "content")
    ):
        raise InvalidInputError(
            f"message {index} must be a mapping or an object with 'role' and "
            f"'content' attributes, got {type(message).__name__}"
        )


def _message_list(messages: Iterable[object]) -> list[object]:
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Iterable):
        raise InvalidInputError(
            f"messages must be a sequence of messages, got {type(messages).__name__}"
        )
    items = list(messages)
    for index, message in enumerate(items):
        _check_message_shape(message, index)
    return items


def _raw_role(message: object, index: int) -> str | None:
    """The role as a str, or ``None`` when the message has none."""
    raw = _get(message, "role")
    if raw is _MISSING or raw is None:
        return None
    if isinstance(raw, enum.Enum):
        raw = raw.value
    if not isinstance(raw, str):
        raise InvalidInputError(
            f"message {index}: role must be a str, got {type(raw).__name__}"
        )
    return raw


def _role(message: object, index: int) -> str:
    """Normalised role for the built-in formatters; no role (or "") means user."""
    raw = _raw_role(message, index)
    if raw is None or not raw.strip():
        return "user"
    role = raw.strip().lower()
    if role not in _ROLES:
        raise InvalidInputError(
            f"message {index}: unknown role {raw!r}; expected one of {', '.join(_ROLES)}"
        )
    return role


def _text(message: object, index: int) -> str | None:
    """The text of a message, or ``None`` when it has no text to format.

    A str is used as is. A list of OpenAI-style content parts contributes the
    ``text`` of its ``{"type": "text"}`` parts (and bare str parts), joined with
    nothing in between; other parts (images, audio) are skipped, as are
    messages whose content is ``None``/absent or holds no text part at all.
    """
    content = _get(message, "content")
    if content is _MISSING or content is None:
        return None
    if isinstance(content, str):
        return content
    if isinstance(content, (list, tuple)):
        pieces: list[str] = []
        for part in content:
            if isinstance(part, str):
                pieces.append(part)
                continue
            if not isinstance(part, Mapping) and not hasattr(part, "type"):
                raise InvalidInputError(
                    f"message {index}: a content part must be a str or a mapping with "
                    f"a 'type', got {type(part).__name__}"
                )
            if _get(part, "type") != "text":
                continue
            text = _get(part, "text")
            if not isinstance(text, str):
                raise InvalidInputError(
                    f"message {index}: a text content part needs a str 'text'"
                )
            pieces.append(text)
        return "".join(pieces) if pieces else None
    raise InvalidInputError(
        f"message {index}: content must be a str, a list of content parts or None, "
        f"got {type(content).__name__}"
    )


def _turns(messages: Iterable[object]) -> list[tuple[str, str]]:
    items = _message_list(messages)
    if not items:
        raise InvalidInputError("messages is empty; at least one message is needed")
    turns: list[tuple[str, str]] = []
    for index, message in enumerate(items):
        role = _role(message, index)
        text = _text(message, index)
        if text is not None:
            turns.append((role, text))
    if not turns:
        raise InvalidInputError("no message carries text content")
    return turns


# ---------------------------------------------------------------------------
# Built-in formatters
# ---------------------------------------------------------------------------

# Gemma and Llama-2 have no tool role: a tool result goes back as user input,
# labelled so the model can tell it from something the user typed.
_TOOL_PREFIX = "[Tool Result]\n"
_GEMMA_SYSTEM_PREFIX = "[System Instructions]\n"


def _format_chatml(turns: list[tuple[str, str]], add_generation_prompt: bool) -> str:
    out = [f"<|im_start|>{role}\n{text}<|im_end|>\n" for role, text in turns]
    if add_generation_prompt:
        out.append("<|im_start|>assistant\n")
    return "".join(out)


def _format_gemma(turns: list[tuple[str, str]], add_generation_prompt: bool) -> str:
    out: list[str] = []
    for role, text in turns:
        if role == "assistant":
            out.append(f"<start_of_turn>model\n{text}<end_of_turn>\n")
        elif role == "system":
            out.append(f"<start_of_turn>user\n{_GEMMA_SYSTEM_PREFIX}{text}<end_of_turn>\n")
        elif role == "tool":
            out.append(f"<start_of_turn>user\n{_TOOL_PREFIX}{text}<end_of_turn>\n")
        else:
            out.append(f"<start_of_turn>user\n{text}<end_of_turn>\n")
    if add_generation_prompt:
        out.append("<start_of_turn>model\n")
    return "".join(out)


def _format_llama2(turns: list[tuple[str, str]]) -> str:
    # System text, wherever it appears, goes into the <<SYS>> block of the first
    # [INST]; several system messages are joined with a blank line.
    system_parts = [text for role, text in turns if role == "system"]
    system = "\n\n".join(system_parts) if system_parts else None
    rest = [
        (role, _TOOL_PREFIX + text if role == "tool" else text)
        for role, text in turns
        if role != "system"
    ]
    sys_block = f"<<SYS>>\n{system}\n<</SYS>>\n\n" if system is not None else ""
    if not rest:
        return f"[INST] {sys_block} [/INST] "

    out: list[str] = []
    i = 0
    while i < len(rest):
        # Every non-assistant turn opens an [INST] block; an assistant turn with
        # no user turn before it is placed in the block as context.
        out.append("[INST] ")
        if i == 0:
            out.append(sys_block)
        out.append(rest[i][1])
        out.append(" [/INST] ")
        if i + 1 < len(rest) and rest[i + 1][0] == "assistant":
            out.append(rest[i + 1][1])
            i += 2
            if i < len(rest):
                out.append(" </s><s>")
        else:
            i += 1
    return "".join(out)


def format_messages(
    messages: Iterable[object],
    fmt: ChatFormat,
    add_generation_prompt: bool = True,
) -> str:
    """Render a conversation with one of the built-in formats.

    Message rules:

    * A message without a role (missing, ``None`` or ``""``) is a user message.
      Roles are ``system``, ``user``, ``assistant`` and ``tool`` (case-insensitive);
      anything else raises :class:`InvalidInputError`.
    * Messages without text (content ``None``, or only non-text parts) are
      skipped; at least one message must carry text.
    * ChatML writes every role as it is, ``tool`` included.
    * Gemma writes ``assistant`` as ``model``; a system message becomes a user
      turn starting with ``[System Instructions]\\n``, a tool message a user turn
      starting with ``[Tool Result]\\n``.
    * Llama-2 puts the system text in a ``<<SYS>>`` block inside the first
      ``[INST]``; a tool message is user input starting with ``[Tool Result]\\n``.
      Its user turn always ends with ``[/INST] ``, which is where the reply
      starts, so ``add_generation_prompt`` changes nothing for Llama-2.

    Double-formatting guard: when exactly one message carries text, its role is
    user, and :func:`is_preformatted` says its text is already a prompt in this
    same ``fmt``, the text is returned unchanged (no wrapping, no generation
    prompt added). A prompt in another format is wrapped like any other text.
    """
    if not isinstance(fmt, ChatFormat):
        raise InvalidInputError(f"fmt must be a ChatFormat, got {fmt!r}")
    turns = _turns(messages)
    if len(turns) == 1:
        role, text = turns[0]
        if role == "user" and is_preformatted(text, fmt):
            return text
    if fmt is ChatFormat.CHATML:
        return _format_chatml(turns, add_generation_prompt)
    if fmt is ChatFormat.GEMMA:
        return _format_gemma(turns, add_generation_prompt)
    return _format_llama2(turns)


# ---------------------------------------------------------------------------
# Template objects
# ---------------------------------------------------------------------------


class ChatTemplate(Protocol):
    """What :func:`resolve_chat_template` returns: a named prompt renderer."""

    @property
    def name(self) -> str:
        """Which template was chosen, e.g. ``"jinja:model"`` or ``"chatml"``."""
        ...

    def render(
        self,
        messages: Iterable[object],
        *,
        add_generation_prompt: bool = True,
        tools: Iterable[object] | None = None,
        **extra: Any,
    ) -> str:
        """Render the conversation into prompt text."""
        ...


class BuiltinChatTemplate:
    """A :class:`ChatFormat` behind the :class:`ChatTemplate` interface."""

    def __init__(self, fmt: ChatFormat) -> None:
        if not isinstance(fmt, ChatFormat):
            raise InvalidInputError(f"fmt must be a ChatFormat, got {fmt!r}")
        self.fmt = fmt
        self.name: str = fmt.value

    def render(
        self,
        messages: Iterable[object],
        *,
        add_generation_prompt: bool = True,
        tools: Iterable[object] | None = None,
        **extra: Any,
    ) -> str:
        """Format with :func:`format_messages`.

        The built-in formats have no syntax for tool definitions, so a non-empty
        ``tools`` raises :class:`UnsupportedInputError` rather than being dropped
        without the model ever seeing them. ``extra`` holds template variables
        (``enable_thinking`` and the like) that only Jinja templates read; they
        are accepted and ignored, as a Jinja template ignores unknown variables.
        """
        if tools is not None and list(tools):
            raise UnsupportedInputError(
                f"tool definitions need a Jinja chat template; the built-in "
                f"{self.name!r} format has no syntax for them"
            )
        return format_messages(messages, self.fmt, add_generation_prompt)

    def __repr__(self) -> str:
        return f"BuiltinChatTemplate({self.fmt!r})"




def _plain(value: object) -> object:
    """Copy ``value`` into plain data (dict, list, str, numbers, bool, None).

    Templates index messages like dicts; dataclasses, enums and pydantic models
    become their plain equivalents so they look the way a template expects.
    """
    # Enums first: a str-mixin enum member would otherwise print as "Role.USER".
    if isinstance(value, enum.Enum):
        return _plain(value.value)
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            field.name: _plain(getattr(value, field.name))
            for field in dataclasses.fields(value)
        }
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    dump = getattr(value, "model_dump", None)
    if callable(dump):
        return _plain(dump())
    return value


def _message_dict(message: object, index: int) -> dict[str, object]:
    """One message as the dict a template sees.

    All keys are kept (``tool_calls``, ``name``, ``reasoning_content``...),
    except those whose value is ``None``: templates test ``'tool_calls' in
    message``, and OpenAI clients often send ``"tool_calls": null``. The role is
    a str (``"user"`` when missing); ``content`` is always present, ``None`` when
    the message has none.
    """
    if isinstance(message, Mapping):
        raw: dict[str, object] = dict(message)
    elif dataclasses.is_dataclass(message) and not isinstance(message, type):
        raw = {f.name: getattr(message, f.name) for f in dataclasses.fields(message)}
    else:
        attributes: dict[str, object] = getattr(message, "__dict__", {})
        raw = {key: item for key, item in attributes.items() if not key.startswith("_")}
        for key in ("role", "content"):
            if key not in raw and hasattr(message, key):
                raw[key] = getattr(message, key)
    role = _raw_role(message, index)
    content = raw.get("content")
    out: dict[str, object] = {
        key: _plain(item)
        for key, item in raw.items()
        if item is not None and key not in ("role", "content")
    }
    out["role"] = role if role is not None and role != "" else "user"
    out["content"] = _plain(content)
    return out


def _tools_list(tools: Iterable[object] | None) -> list[object] | None:
    if tools is None:
        return None
    if isinstance(tools, (str, bytes, Mapping)) or not isinstance(tools, Iterable):
        raise InvalidInputError(
            f"tools must be a list of tool definitions, got {type(tools).__name__}"
        )
    out: list[object] = []
    for index, tool in enumerate(tools):
        item = _plain(tool)
        if not isinstance(item, dict):
            raise InvalidInputError(
                f"tool {index} must be a mapping (an OpenAI-style tool definition), "
                f"got {type(tool).__name__}"
            )
        out.append(item)
    return out


class JinjaChatTemplate:
    """A model's own Hugging-Face-style chat template, rendered in a sandbox.

    The environment copies the one ``transformers`` builds for
    ``apply_chat_template`` (an immutable sandbox, ``trim_blocks``,
    ``lstrip_blocks``, loop controls, the ``generation`` tag, and the globals
    ``raise_exception`` and ``strftime_now`` and a ``tojson`` filter with
    ``ensure_ascii=False``), so a model gets the same prompt text it was trained
    on. The sandbox keeps a template from reaching Python internals
    (``''.__class__`` is undefined, chaining further raises) or mutating its
    inputs (``messages.append`` raises).

    ``bos_token``/``eos_token`` are what the template sees for those names.
    Leave ``bos_token`` empty when the tokenizer adds BOS itself, or the prompt
    ends up with two.
    """

    def __init__(
        self,
        source: str,
        *,
        bos_token: str = "",
        eos_token: str = "",
        name: str = "jinja",
    ) -> None:
        if not isinstance(source, str):
            raise InvalidInputError(
                f"chat template source must be a str, got {type(source).__name__}"
            )
        if not isinstance(bos_token, str) or not isinstance(eos_token, str):
            raise InvalidInputError("bos_token and eos_token must be str")
        self.source = source
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.name = name
        # Imported here: jinja2 costs ~50 ms and several MB, and many programs
        # never render a model's own template.
        from xybrid import jinja_sandbox

        try:
            self._template = jinja_sandbox.environment().from_string(source)
        except jinja_sandbox.TemplateSyntaxError as exc:
            raise InvalidInputError(
                f"chat template syntax error at line {exc.lineno}: {exc.message}"
            ) from exc
        except jinja_sandbox.COMPILE_ERRORS as exc:
            raise InvalidInputError(
                f"chat template cannot be compiled: {type(exc).__name__}: {exc} (it nests "
                "blocks or expressions too deeply)"
            ) from None

    def render(
        self,
        messages: Iterable[object],
        *,
        add_generation_prompt: bool = True,
        tools: Iterable[object] | None = None,
        **extra: Any,
    ) -> str:
        """Render ``messages`` (and ``tools``) with the template.

        The template sees ``messages`` as a list of dicts, ``tools`` as a list of
        OpenAI-style tool dicts or ``None``, ``add_generation_prompt``,
        ``bos_token``, ``eos_token`` and every keyword in ``extra``
        (``enable_thinking=False``, ``date_string=...``; ``extra`` may also
        override the two token names). A ``raise_exception`` call in the
        template raises :class:`InvalidInputError` with the template's own
        message; any other failure while rendering raises
        :class:`InvalidInputError` naming the cause.
        """
        items = _message_list(messages)
        context: dict[str, object] = {
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
        }
        context.update({key: _plain(value) for key, value in extra.items()})
        context["messages"] = [
            _message_dict(message, index) for index, message in enumerate(items)
        ]
        context["tools"] = _tools_list(tools)
        context["add_generation_prompt"] = bool(add_generation_prompt)
        from xybrid import jinja_sandbox

        try:
            return jinja_sandbox.render_bounded(self._template, context)
        except InvalidInputError:
            raise
        except jinja_sandbox.RENDER_ERRORS as exc:
            raise InvalidInputError(
                f"chat template {self.name!r} failed: {type(exc).__name__}: {exc}"
            ) from exc

    def __repr__(self) -> str:
        return f"JinjaChatTemplate(name={self.name!r}, {len(self.source)} chars)"


def _known_format(text: str) -> ChatFormat | None:
    try:
        return ChatFormat.from_name(text.strip())
    except InvalidInputError:
        return None


def resolve_chat_template(
    override: str | None,
    model_template: str | None,
    architecture: str | None,
    *,
    bos_token: str = "",
    eos_token: str = "",
) -> ChatTemplate:
    """Choose how a model's conversations are rendered.

    1. ``override`` (from the user), when given and not blank: a known format
       name (see :meth:`ChatFormat.from_name`) selects that built-in format;
       anything else is Jinja source (name ``"jinja:override"``), and a syntax
       error in it raises :class:`InvalidInputError`.
    2. Else the model's template (GGUF ``tokenizer.chat_template``) when present
       and not blank, as Jinja (``"jinja:model"``); a bare format name stored
       there selects that built-in format.
    3. Else the format :func:`format_for_architecture` infers
       (``"chatml"``, ``"llama2"`` or ``"gemma"``).

    ``bos_token``/``eos_token`` are handed to a Jinja template; see
    :class:`JinjaChatTemplate`.
    """
    if override is not None and not isinstance(override, str):
        raise InvalidInputError(
            f"chat template override must be a str or None, got {type(override).__name__}"
        )
    if model_template is not None and not isinstance(model_template, str):
        raise InvalidInputError(
            f"model chat template must be a str or None, got {type(model_template).__name__}"
        )
    for source, label in ((override, "jinja:override"), (model_template, "jinja:model")):
        if source is None or not source.strip():
            continue
        fmt = _known_format(source)
        if fmt is not None:
            return BuiltinChatTemplate(fmt)
        return JinjaChatTemplate(source, bos_token=bos_token, eos_token=eos_token, name=label)
    return BuiltinChatTemplate(format_for_architecture(architecture))
