"""Prometheus metrics of the gateway, on a per-app registry, and the ASGI middleware feeding them.

Names follow the common FastAPI instrumentation (`http_requests_total{handler,method,status}`,
`http_request_duration_seconds{handler,method}`, measured to the last byte of streamed bodies)
plus `vlm:`-prefixed gauges/counters the dashboards of the other services use. The handler label
is the matched route template (or "unmatched"), never a raw path, to bound label cardinality.
Not here: decoder/engine metrics (the decoder exports its own).
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

_LATENCY_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "http_requests_total",
            "HTTP requests by route template, method and response status.",
            ["handler", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "http_request_duration_seconds",
            "Time from request start to the last response byte.",
            ["handler", "method"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "vlm:gateway_requests_in_flight",
            "Generation requests currently holding an admission slot.",
            registry=self.registry,
        )
        self.client_disconnects = Counter(
            "vlm:gateway_client_disconnects_total",
            "Generation requests whose client went away before the answer was complete.",
            registry=self.registry,
        )


class MetricsMiddleware:
    def __init__(self, app: ASGIApp, metrics: GatewayMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.monotonic()
        status = 500

        async def send_and_record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            route = scope.get("route")
            handler = getattr(route, "path", "unmatched")
            method = scope.get("method", "")
            self.metrics.requests.labels(handler, method, str(status)).inc()
            self.metrics.latency.labels(handler, method).observe(time.monotonic() - start)
