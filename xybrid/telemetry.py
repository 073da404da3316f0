"""Turn the engine's timestamps into latency and throughput figures.

The native loop only records integer nanosecond timestamps from a monotonic
clock (it must not do arithmetic or touch Python objects per token); every
derived figure is computed here, after the run, by pure functions that are easy
to test. The OpenTelemetry hook is optional: nothing here needs the
``opentelemetry`` package unless the caller has it installed.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from xybrid.errors import InvalidInputError
from xybrid.types import GenerationOutput

__all__ = [
    "TelemetryFields",
    "compute_telemetry",
    "percentile_nearest_rank",
    "SPAN_ATTRIBUTE_NAMES",
    "span_attributes",
    "record_on_current_span",
]

_NS_PER_MS: Final[float] = 1_000_000.0
_NS_PER_S: Final[float] = 1_000_000_000.0


@dataclass(frozen=True)
class TelemetryFields:
    """Figures derived from one run's timestamps (times in ms, rates per second).

    - ``generation_time_ms``: ``end - start``, prefill included.
    - ``tokens_per_second``: tokens sampled divided by the whole run time
      (wall-clock, prefill included); ``0.0`` for an empty or instantaneous run.
    - ``ttft_ms``: first sampled token minus ``start``; ``None`` without tokens.
    - ``mean_itl_ms`` / ``p95_itl_ms``: mean and nearest-rank 95th percentile
      of the gaps between consecutive token times; ``None`` below two tokens.
    - ``emitted_chunks``: how many chunks the consumer received.
    - ``inter_chunk_ms``: mean gap between consecutive received chunks;
      ``None`` below two chunks.
    - ``decode_tps``: ``(n_tokens - 1) / (last_token - first_token)``. The
      first token's cost belongs to prefill (its logits come out of the prompt
      batch), so steady-state decode speed counts the ``n - 1`` tokens made
      after it over the time they took. ``None`` below two tokens or when the
      span is zero.
    - ``prefill_tps``: ``prefilled_tokens / (prefill_end - start)``, counting
      only the tokens actually decoded (a cached prefix costs nothing);
      ``None`` when nothing was prefilled or the span is zero.
    - ``prompt_tokens`` / ``cached_prompt_tokens``: the prompt size and the
      part of it served from the KV cache (``prompt_tokens - prefilled_tokens``).
    """

    generation_time_ms: float
    tokens_per_second: float
    ttft_ms: float | None
    mean_itl_ms: float | None
    p95_itl_ms: float | None
    emitted_chunks: int
    inter_chunk_ms: float | None
    decode_tps: float | None
    prefill_tps: float | None
    prompt_tokens: int
    cached_prompt_tokens: int


def percentile_nearest_rank(values: Sequence[float], percent: float) -> float:
    """Nearest-rank percentile: the smallest value with at least ``percent``% of
    the data at or below it, i.e. ``sorted(values)[ceil(percent/100 * n) - 1]``.

    Chosen because it always returns an observed gap (no interpolation), which
    is what a latency percentile should report. ``percent`` is in ``(0, 100]``.
    """
    if not values:
        raise InvalidInputError("percentile_nearest_rank needs at least one value")
    if not 0.0 < percent <= 100.0:
        raise InvalidInputError(f"percent must be in (0, 100], got {percent!r}")
    ordered = sorted(values)
    rank = math.ceil(percent / 100.0 * len(ordered))
    return ordered[max(rank, 1) - 1]


def _as_int_list(name: str, values: Iterable[int]) -> list[int]:
    out = [int(v) for v in values]
    for earlier, later in zip(out, out[1:]):
        if later < earlier:
            raise InvalidInputError(f"{name} must be non-decreasing, got {earlier} then {later}")
    return out


def _gaps_ms(times_ns: Sequence[int]) -> list[float]:
    return [(b - a) / _NS_PER_MS for a, b in zip(times_ns, times_ns[1:])]


def compute_telemetry(
    *,
    start_ns: int,
    prefill_end_ns: int,
    token_times_ns: Iterable[int],
    chunk_times_ns: Iterable[int],
    end_ns: int,
    prompt_tokens: int,
    prefilled_tokens: int,
) -> TelemetryFields:
    """Derive :class:`TelemetryFields` from one run's monotonic timestamps.

    ``token_times_ns`` has one entry per sampled token, in order;
    ``chunk_times_ns`` one per chunk handed to the consumer (empty for a
    non-streaming call). Timestamps must be ordered
    ``start <= prefill_end <= end`` with every token time within
    ``[start, end]``; anything else is an engine bug and raises
    ``InvalidInputError`` rather than producing negative latencies.
    """
    tokens = _as_int_list("token_times_ns", token_times_ns)
    chunks = _as_int_list("chunk_times_ns", chunk_times_ns)
    if not start_ns <= prefill_end_ns <= end_ns:
        raise InvalidInputError(
            "timestamps must satisfy start_ns <= prefill_end_ns <= end_ns, got "
            f"{start_ns}, {prefill_end_ns}, {end_ns}"
        )
    if tokens and (tokens[0] < start_ns or tokens[-1] > end_ns):
        raise InvalidInputError("token_times_ns must lie within [start_ns, end_ns]")
    if prompt_tokens < 0 or not 0 <= prefilled_tokens <= prompt_tokens:
        raise InvalidInputError(
            "need 0 <= prefilled_tokens <= prompt_tokens, got "
            f"prefilled_tokens={prefilled_tokens}, prompt_tokens={prompt_tokens}"
        )

    total_ns = end_ns - start_ns
    n_tokens = len(tokens)
    token_gaps = _gaps_ms(tokens)
    chunk_gaps = _gaps_ms(chunks)

    decode_tps: float | None = None
    if n_tokens >= 2 and tokens[-1] > tokens[0]:
        decode_tps = (n_tokens - 1) / ((tokens[-1] - tokens[0]) / _NS_PER_S)

    prefill_ns = prefill_end_ns - start_ns
    prefill_tps: float | None = None
    if prefilled_tokens > 0 and prefill_ns > 0:
        prefill_tps = prefilled_tokens / (prefill_ns / _NS_PER_S)

    return TelemetryFields(
        generation_time_ms=total_ns / _NS_PER_MS,
        tokens_per_second=n_tokens / (total_ns / _NS_PER_S) if total_ns > 0 else 0.0,
        ttft_ms=(tokens[0] - start_ns) / _NS_PER_MS if tokens else None,
        mean_itl_ms=sum(token_gaps) / len(token_gaps) if token_gaps else None,
        p95_itl_ms=percentile_nearest_rank(token_gaps, 95.0) if token_gaps else None,
        emitted_chunks=len(chunks),
        inter_chunk_ms=sum(chunk_gaps) / len(chunk_gaps) if chunk_gaps else None,
        decode_tps=decode_tps,
        prefill_tps=prefill_tps,
        prompt_tokens=prompt_tokens,
        cached_prompt_tokens=prompt_tokens - prefilled_tokens,
    )


# ---------------------------------------------------------------------------
# OpenTelemetry
# ---------------------------------------------------------------------------

#: Attribute name for each GenerationOutput figure. The first four follow the
#: OpenTelemetry GenAI semantic conventions; the rest have no standard name
#: yet, so they live under ``gen_ai.xybrid.`` to avoid clashing with a future
#: official attribute of different meaning. Units are in the names.
SPAN_ATTRIBUTE_NAMES: Final[dict[str, str]] = {
    "prompt_tokens": "gen_ai.usage.input_tokens",
    "tokens_generated": "gen_ai.usage.output_tokens",
    "finish_reason": "gen_ai.response.finish_reasons",
    "cached_prompt_tokens": "gen_ai.usage.cache_read.input_tokens",
    "stop_reason": "gen_ai.xybrid.stop_reason",
    "generation_time_ms": "gen_ai.xybrid.generation_time_ms",
    "tokens_per_second": "gen_ai.xybrid.tokens_per_second",
    "ttft_ms": "gen_ai.xybrid.ttft_ms",
    "mean_itl_ms": "gen_ai.xybrid.mean_itl_ms",
    "p95_itl_ms": "gen_ai.xybrid.p95_itl_ms",
    "emitted_chunks": "gen_ai.xybrid.emitted_chunks",
    "inter_chunk_ms": "gen_ai.xybrid.inter_chunk_ms",
    "decode_tps": "gen_ai.xybrid.decode_tokens_per_second",
    "prefill_tps": "gen_ai.xybrid.prefill_tokens_per_second",
}


def span_attributes(output: GenerationOutput) -> dict[str, object]:
    """Map an output's telemetry to span attribute names (see
    ``SPAN_ATTRIBUTE_NAMES``).

    Figures that are ``None`` are left out, because OpenTelemetry attributes
    cannot hold ``None``. ``finish_reasons`` is a one-element tuple since the
    convention defines it as a string array (one entry per choice).
    """
    attributes: dict[str, object] = {}
    for field_name, attribute in SPAN_ATTRIBUTE_NAMES.items():
        value: object = getattr(output, field_name)
        if value is None:
            continue
        if field_name == "finish_reason":
            value = (value,)
        attributes[attribute] = value
    return attributes


def record_on_current_span(output: GenerationOutput) -> bool:
    """Set :func:`span_attributes` on the current OpenTelemetry span.

    Returns True when attributes were recorded. When ``opentelemetry`` is not
    installed, or no recording span is active, nothing happens and False is
    returned: tracing is an optional extra, never a requirement.
    """
    # No span can be active unless the caller's tracing has already loaded
    # opentelemetry.trace, so look in sys.modules instead of importing: a
    # failed import searches sys.path on every call, and each of its file
    # system calls hands the GIL to other threads (a switch interval, 5 ms,
    # to get it back when one is busy).
    trace: Any = sys.modules.get("opentelemetry.trace")
    if trace is None:
        return False
    span = trace.get_current_span()
    if not span.is_recording():
        return False
    # The mapping only holds str, int, float and tuple[str] values, all of
    # which OpenTelemetry accepts as attribute values.
    span.set_attributes(span_attributes(output))
    return True
