"""Prometheus metrics of ``xybrid serve`` (``GET /metrics``).

Each app has its own registry, so several servers in one process (tests)
do not collide. Engine load (slots, queue, KV cells) is read at scrape time
from ``backend.stats()``, which may be empty on an engine that does not
report it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

__all__ = ["Metrics"]

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class _EngineCollector(Collector):
    def __init__(self, engine: Any) -> None:
        self.engine = engine

    def collect(self) -> Iterator[GaugeMetricFamily]:
        engine = self.engine
        yield GaugeMetricFamily("xybrid_model_ready", "1 when the model is loaded and serving",
                                value=1.0 if engine.state == "ready" else 0.0)
        yield GaugeMetricFamily("xybrid_sequences_in_flight",
                                "sequences admitted and not finished (running or queued)",
                                value=float(engine.admission.in_flight))
        yield GaugeMetricFamily("xybrid_admission_capacity",
                                "sequences admitted at most (parallel + max_queued)",
                                value=float(engine.admission.capacity))
        for key, value in sorted(engine.stats().items()):
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                name = "xybrid_engine_" + "".join(c if c.isalnum() else "_" for c in key)
                yield GaugeMetricFamily(name, f"engine statistic {key!r}", value=float(value))


class Metrics:
    """Counters and histograms the handlers update."""

    def __init__(self, engine: Any) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("xybrid_requests", "HTTP requests answered",
                                ["path", "status"], registry=r)
        self.latency = Histogram("xybrid_request_duration_seconds",
                                 "time from request to the end of the response", ["path"],
                                 buckets=_LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("xybrid_time_to_first_token_seconds",
                              "time from request to the first generated token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("xybrid_prompt_tokens", "prompt tokens processed",
                                     registry=r)
        self.cached_tokens = Counter("xybrid_prompt_cached_tokens",
                                     "prompt tokens served from the KV cache", registry=r)
        self.completion_tokens = Counter("xybrid_completion_tokens", "tokens generated",
                                         registry=r)
        self.rejected = Counter("xybrid_requests_rejected",
                                "requests refused because the server was overloaded",
                                registry=r)
        self.disconnects = Counter("xybrid_client_disconnects",
                                   "requests whose client went away before the end", registry=r)
        self.in_progress = Gauge("xybrid_requests_in_progress", "HTTP requests being served",
                                 registry=r)
        r.register(_EngineCollector(engine))

    def render(self) -> bytes:
        return generate_latest(self.registry)
