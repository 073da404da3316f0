"""Tests of xybrid.telemetry: timestamp arithmetic and the span hook."""

from __future__ import annotations

import sys
import types
from typing import Any

import numpy as np
import pytest

from xybrid.errors import InvalidInputError
from xybrid.telemetry import (
    SPAN_ATTRIBUTE_NAMES,
    TelemetryFields,
    compute_telemetry,
    percentile_nearest_rank,
    record_on_current_span,
    span_attributes,
)
from xybrid.types import GenerationOutput

MS = 1_000_000  # nanoseconds per millisecond


def telemetry(**overrides: Any) -> TelemetryFields:
    args: dict[str, Any] = {
        "start_ns": 0,
        "prefill_end_ns": 0,
        "token_times_ns": [],
        "chunk_times_ns": [],
        "end_ns": 0,
        "prompt_tokens": 0,
        "prefilled_tokens": 0,
    }
    args.update(overrides)
    return compute_telemetry(**args)


# ---------------------------------------------------------------------------
# percentile
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "percent", "expected"),
    [
        ([5.0], 95.0, 5.0),
        ([1.0, 2.0], 95.0, 2.0),  # ceil(1.9) = 2 -> 2nd smallest
        ([1.0, 2.0], 50.0, 1.0),  # ceil(1.0) = 1 -> smallest
        (list(map(float, range(1, 21))), 95.0, 19.0),  # ceil(19.0) = 19
        (list(map(float, range(1, 22))), 95.0, 20.0),  # ceil(19.95) = 20
        (list(map(float, range(1, 101))), 95.0, 95.0),
        (list(map(float, range(100, 0, -1))), 95.0, 95.0),  # order of input irrelevant
        ([3.0, 1.0, 2.0], 100.0, 3.0),
        ([3.0, 1.0, 2.0], 1.0, 1.0),
    ],
)
def test_percentile_nearest_rank(values: list[float], percent: float, expected: float) -> None:
    assert percentile_nearest_rank(values, percent) == expected


@pytest.mark.parametrize(("values", "percent"), [([], 95.0), ([1.0], 0.0), ([1.0], 101.0)])
def test_percentile_rejects_bad_input(values: list[float], percent: float) -> None:
    with pytest.raises(InvalidInputError):
        percentile_nearest_rank(values, percent)


# ---------------------------------------------------------------------------
# compute_telemetry
# ---------------------------------------------------------------------------


def test_typical_streaming_run() -> None:
    # Prefill 10 of 12 prompt tokens in 20 ms, then tokens at 30, 40, 55, 60 ms.
    fields = telemetry(
        start_ns=1_000 * MS,
        prefill_end_ns=1_020 * MS,
        token_times_ns=[1_030 * MS, 1_040 * MS, 1_055 * MS, 1_060 * MS],
        chunk_times_ns=[1_031 * MS, 1_056 * MS, 1_061 * MS],
        end_ns=1_080 * MS,
        prompt_tokens=12,
        prefilled_tokens=10,
    )
    assert fields.generation_time_ms == pytest.approx(80.0)
    assert fields.tokens_per_second == pytest.approx(4 / 0.080)
    assert fields.ttft_ms == pytest.approx(30.0)
    # Gaps 10, 15, 5 ms.
    assert fields.mean_itl_ms == pytest.approx(10.0)
    assert fields.p95_itl_ms == pytest.approx(15.0)
    assert fields.emitted_chunks == 3
    # Chunk gaps 25, 5 ms.
    assert fields.inter_chunk_ms == pytest.approx(15.0)
    # (4 - 1) tokens over the 30 ms between first and last.
    assert fields.decode_tps == pytest.approx(3 / 0.030)
    assert fields.prefill_tps == pytest.approx(10 / 0.020)
    assert fields.prompt_tokens == 12
    assert fields.cached_prompt_tokens == 2


def test_single_token_leaves_gap_figures_undefined() -> None:
    fields = telemetry(
        prefill_end_ns=5 * MS,
        token_times_ns=[6 * MS],
        chunk_times_ns=[7 * MS],
        end_ns=8 * MS,
        prompt_tokens=3,
        prefilled_tokens=3,
    )
    assert fields.ttft_ms == pytest.approx(6.0)
    assert fields.mean_itl_ms is None
    assert fields.p95_itl_ms is None
    assert fields.decode_tps is None
    assert fields.inter_chunk_ms is None
    assert fields.emitted_chunks == 1
    assert fields.tokens_per_second == pytest.approx(1 / 0.008)
    assert fields.cached_prompt_tokens == 0


def test_no_tokens_and_non_streaming() -> None:
    fields = telemetry(prefill_end_ns=4 * MS, end_ns=5 * MS, prompt_tokens=2, prefilled_tokens=2)
    assert fields.ttft_ms is None
    assert fields.mean_itl_ms is None
    assert fields.emitted_chunks == 0
    assert fields.inter_chunk_ms is None
    assert fields.tokens_per_second == 0.0
    assert fields.prefill_tps == pytest.approx(2 / 0.004)


def test_zero_durations_give_none_or_zero_not_division_errors() -> None:
    fields = telemetry(token_times_ns=[0, 0], prompt_tokens=1, prefilled_tokens=1)
    assert fields.generation_time_ms == 0.0
    assert fields.tokens_per_second == 0.0
    assert fields.decode_tps is None  # last == first
    assert fields.prefill_tps is None  # zero prefill span
    assert fields.mean_itl_ms == 0.0
    assert fields.p95_itl_ms == 0.0


def test_fully_cached_prompt_has_no_prefill_rate() -> None:
    fields = telemetry(prefill_end_ns=MS, end_ns=2 * MS, prompt_tokens=9, prefilled_tokens=0)
    assert fields.prefill_tps is None
    assert fields.cached_prompt_tokens == 9


def test_p95_picks_the_slow_gap_among_twenty() -> None:
    times = [0]
    for i in range(20):
        times.append(times[-1] + (100 if i == 7 else 10) * MS)
    fields = telemetry(token_times_ns=times, end_ns=times[-1], prefill_end_ns=0)
    # 20 gaps: nineteen of 10 ms and one of 100 ms; rank ceil(19) = 19 -> 10 ms.
    assert fields.p95_itl_ms == pytest.approx(10.0)
    assert fields.mean_itl_ms == pytest.approx((19 * 10 + 100) / 20)
    times.append(times[-1] + 100 * MS)
    fields = telemetry(token_times_ns=times, end_ns=times[-1], prefill_end_ns=0)
    # 21 gaps, two of 100 ms; rank ceil(19.95) = 20 -> 100 ms.
    assert fields.p95_itl_ms == pytest.approx(100.0)


def test_accepts_numpy_timestamp_arrays() -> None:
    tokens = np.array([10, 20, 30], dtype=np.int64) * MS
    fields = telemetry(token_times_ns=tokens, chunk_times_ns=tokens, end_ns=40 * MS)
    assert fields.decode_tps == pytest.approx(2 / 0.020)
    assert fields.emitted_chunks == 3
    assert isinstance(fields.emitted_chunks, int)


@pytest.mark.parametrize(
    "overrides",
    [
        {"start_ns": 10, "prefill_end_ns": 5, "end_ns": 20},
        {"start_ns": 0, "prefill_end_ns": 30, "end_ns": 20},
        {"end_ns": 100, "token_times_ns": [50, 40]},
        {"end_ns": 100, "chunk_times_ns": [50, 40]},
        {"end_ns": 100, "token_times_ns": [150]},
        {"start_ns": 10, "prefill_end_ns": 10, "end_ns": 100, "token_times_ns": [5]},
        {"prompt_tokens": 2, "prefilled_tokens": 3},
        {"prompt_tokens": 2, "prefilled_tokens": -1},
    ],
)
def test_inconsistent_timestamps_are_rejected(overrides: dict[str, Any]) -> None:
    with pytest.raises(InvalidInputError):
        telemetry(**overrides)


# ---------------------------------------------------------------------------
# Span attributes
# ---------------------------------------------------------------------------


def make_output(**overrides: Any) -> GenerationOutput:
    values: dict[str, Any] = {
        "text": "Hi",
        "tokens_generated": 4,
        "generation_time_ms": 80.0,
        "tokens_per_second": 50.0,
        "finish_reason": "stop",
        "ttft_ms": 30.0,
        "mean_itl_ms": 10.0,
        "p95_itl_ms": 15.0,
        "emitted_chunks": 3,
        "inter_chunk_ms": 15.0,
        "decode_tps": 100.0,
        "prefill_tps": 500.0,
        "prompt_tokens": 12,
        "cached_prompt_tokens": 2,
        "stop_reason": "eog",
    }
    values.update(overrides)
    return GenerationOutput(**values)


def test_span_attributes_full() -> None:
    attributes = span_attributes(make_output())
    assert attributes["gen_ai.usage.input_tokens"] == 12
    assert attributes["gen_ai.usage.output_tokens"] == 4
    assert attributes["gen_ai.usage.cache_read.input_tokens"] == 2
    assert attributes["gen_ai.response.finish_reasons"] == ("stop",)
    assert attributes["gen_ai.xybrid.stop_reason"] == "eog"
    assert attributes["gen_ai.xybrid.ttft_ms"] == 30.0
    assert attributes["gen_ai.xybrid.p95_itl_ms"] == 15.0
    assert attributes["gen_ai.xybrid.decode_tokens_per_second"] == 100.0
    assert set(attributes) == set(SPAN_ATTRIBUTE_NAMES.values())
    assert all(name.startswith("gen_ai.") for name in attributes)


def test_span_attributes_leave_out_unknown_figures() -> None:
    output = make_output(ttft_ms=None, mean_itl_ms=None, p95_itl_ms=None, stop_reason=None)
    attributes = span_attributes(output)
    for missing in ("ttft_ms", "mean_itl_ms", "p95_itl_ms", "stop_reason"):
        assert f"gen_ai.xybrid.{missing}" not in attributes
    assert None not in attributes.values()
    assert attributes["gen_ai.usage.output_tokens"] == 4


class FakeSpan:
    def __init__(self, recording: bool) -> None:
        self.recording = recording
        self.attributes: dict[str, object] = {}

    def is_recording(self) -> bool:
        return self.recording

    def set_attributes(self, attributes: dict[str, object]) -> None:
        self.attributes.update(attributes)


def install_fake_opentelemetry(monkeypatch: pytest.MonkeyPatch, span: FakeSpan) -> None:
    package = types.ModuleType("opentelemetry")
    trace = types.ModuleType("opentelemetry.trace")
    trace.get_current_span = lambda: span  # type: ignore[attr-defined]
    package.trace = trace  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "opentelemetry", package)
    monkeypatch.setitem(sys.modules, "opentelemetry.trace", trace)


def test_record_on_current_span_sets_attributes(monkeypatch: pytest.MonkeyPatch) -> None:
    span = FakeSpan(recording=True)
    install_fake_opentelemetry(monkeypatch, span)
    output = make_output()
    assert record_on_current_span(output) is True
    assert span.attributes == span_attributes(output)


def test_record_on_non_recording_span_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    span = FakeSpan(recording=False)
    install_fake_opentelemetry(monkeypatch, span)
    assert record_on_current_span(make_output()) is False
    assert span.attributes == {}


def test_record_without_opentelemetry_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    # A None entry in sys.modules marks a module that cannot be imported.
    monkeypatch.setitem(sys.modules, "opentelemetry", None)
    monkeypatch.setitem(sys.modules, "opentelemetry.trace", None)
    assert record_on_current_span(make_output()) is False


class RecordingFinder:
    """A meta-path finder that only notes which modules were searched for."""

    def __init__(self) -> None:
        self.searched: list[str] = []

    def find_spec(self, name: str, path: object = None, target: object = None) -> None:
        self.searched.append(name)
        return None


def test_record_never_searches_for_an_unloaded_opentelemetry(monkeypatch: pytest.MonkeyPatch) -> None:
    # Called after every generation: a failed import would search sys.path
    # each time, and its file system calls give the GIL away.
    monkeypatch.delitem(sys.modules, "opentelemetry", raising=False)
    monkeypatch.delitem(sys.modules, "opentelemetry.trace", raising=False)
    finder = RecordingFinder()
    monkeypatch.setattr(sys, "meta_path", [finder, *sys.meta_path])
    assert record_on_current_span(make_output()) is False
    assert finder.searched == []
