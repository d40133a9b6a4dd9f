"""Prometheus metrics of the server (`GET /metrics`), read from the engine at each scrape.

The server's own registry (not prometheus-client's process-wide default) holds an HTTP
request counter and a collector that turns `Engine.stats()` into metrics when scraped, so
the engine stays the one source of its numbers. Tokens per second: take
``rate(lorakit_generated_tokens_total[1m])`` in Prometheus, or read
``lorakit_generated_tokens_per_second``, the rate between this scrape and the one before.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

from ..extras import import_optional
from .engine import Engine


class EngineCollector:
    """A prometheus-client collector reading `Engine.stats()` on every scrape."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._lock = threading.Lock()
        self._last: tuple[float, int] | None = None  # (time, tokens) at the previous scrape

    def collect(self) -> Iterator[Any]:
        core = import_optional("prometheus_client.core", "serve", "lorakit serve's /metrics")
        stats = self._engine.stats()
        gauges = (
            ("lorakit_queue_depth", "Requests waiting to join the batch.", "queue_depth"),
            ("lorakit_running_requests", "Requests in the running batch.", "running"),
            ("lorakit_batch_size", "Rows in the last decode step.", "batch_size_last"),
        )
        for name, text, key in gauges:
            yield core.GaugeMetricFamily(name, text, value=stats[key])
        tokens = int(stats["tokens_generated_total"])
        yield core.CounterMetricFamily(
            "lorakit_generated_tokens", "Tokens generated since start.", value=tokens
        )
        yield core.GaugeMetricFamily(
            "lorakit_generated_tokens_per_second",
            "Tokens generated per second since the previous scrape.",
            value=self._rate(tokens),
        )
        yield core.CounterMetricFamily(
            "lorakit_engine_requests",
            "Requests the engine accepted.",
            value=stats["requests_total"],
        )
        per_adapter = core.CounterMetricFamily(
            "lorakit_adapter_requests", "Requests accepted per adapter.", labels=["adapter"]
        )
        # Every loaded adapter has a sample from its load on (0 until its first request), so a
        # scrape never lacks a series that a later one has.
        counts = dict.fromkeys(self._engine.adapters(), 0) | stats["per_adapter_requests"]
        for adapter, count in sorted(counts.items()):
            per_adapter.add_metric([adapter], count)
        yield per_adapter
        yield core.GaugeMetricFamily(
            "lorakit_loaded_adapters", "Adapters loaded.", value=len(self._engine.adapters())
        )

    def _rate(self, tokens: int) -> float:
        now = time.monotonic()
        with self._lock:
            last, self._last = self._last, (now, tokens)
        if last is None or now <= last[0]:
            return 0.0
        return (tokens - last[1]) / (now - last[0])


class ServerMetrics:
    """The server's registry: HTTP requests by route and status, and the engine's numbers."""

    def __init__(self, engine: Engine) -> None:
        prometheus = import_optional("prometheus_client", "serve", "lorakit serve's /metrics")
        self._prometheus = prometheus
        self.registry = prometheus.CollectorRegistry()
        self.http_requests = prometheus.Counter(
            "lorakit_http_requests",
            "HTTP requests answered, by route and status.",
            ["route", "status"],
            registry=self.registry,
        )
        self.registry.register(EngineCollector(engine))

    def count(self, route: str, status: int) -> None:
        """Count one answered request."""
        self.http_requests.labels(route=route, status=str(status)).inc()

    def render(self) -> tuple[bytes, str]:
        """The text exposition of every metric, and its content type."""
        text: bytes = self._prometheus.generate_latest(self.registry)
        return text, str(self._prometheus.CONTENT_TYPE_LATEST)
