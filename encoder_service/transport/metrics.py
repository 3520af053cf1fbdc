"""Transport counters and their Prometheus names.

Exporters and importers count into a plain ``TransportStats`` (no global registry, so tests and
several pools in one process never collide). A service exposes them by registering one
``TransportCollector`` over all of its stats objects:

    prometheus_client.REGISTRY.register(TransportCollector("encoder", [exporter.stats]))

Not here: the service's own metrics (queue depth, latency histograms).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

# Counters, labelled by role (encoder|decoder) and, where it applies, path.
PUTS_TOTAL = "glimpse_transport_puts_total"  # {role, path}: items stored, by the path offered
POOL_FALLBACKS_TOTAL = "glimpse_transport_pool_full_fallbacks_total"  # pool full -> grpc_stream
FETCHES_TOTAL = "glimpse_transport_fetches_total"  # {role, path}: items read, by the path used
FETCH_BYTES_TOTAL = "glimpse_transport_fetch_bytes_total"  # {role, path}
OPEN_FALLBACKS_TOTAL = "glimpse_transport_open_fallbacks_total"  # pool not openable -> grpc_stream
ERRORS_TOTAL = "glimpse_transport_errors_total"  # {role, error}: failed fetches/streams by type
ACKS_TOTAL = "glimpse_transport_acks_total"  # acks naming a live item
RELEASED_TOTAL = "glimpse_transport_released_total"  # items freed by their last ack
EXPIRED_TOTAL = "glimpse_transport_expired_total"  # items freed by TTL
# Gauges.
POOL_USED_BYTES = "glimpse_transport_pool_used_bytes"  # bytes held by live pool slots
POOL_CAPACITY_BYTES = "glimpse_transport_pool_capacity_bytes"
SPILLED_BYTES = "glimpse_transport_spilled_bytes"  # bytes held outside the pool for streaming
POOLS_OPEN = "glimpse_transport_pools_open"  # pools the importer has mapped
DEVICE_HELD_BYTES = "glimpse_transport_device_held_bytes"  # fetched features kept on the device


@dataclass
class TransportStats:
    puts: Counter[str] = field(default_factory=Counter)  # path -> items
    fetches: Counter[str] = field(default_factory=Counter)  # path -> items
    fetch_bytes: Counter[str] = field(default_factory=Counter)  # path -> bytes
    errors: Counter[str] = field(default_factory=Counter)  # error class name -> count
    pool_fallbacks: int = 0
    open_fallbacks: int = 0
    acks: int = 0
    released: int = 0
    expired: int = 0
    # Gauges are read through callbacks so they are never stale.
    gauges: dict[str, Callable[[], float]] = field(default_factory=dict, repr=False)


class TransportCollector:
    """A Prometheus collector summing several ``TransportStats`` of one process."""

    def __init__(self, role: str, stats: Sequence[TransportStats]) -> None:
        self._role = role
        self._stats = list(stats)

    def collect(self) -> Iterator[object]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        def by_label(name: str, doc: str, attr: str, label: str) -> CounterMetricFamily:
            family = CounterMetricFamily(name, doc, labels=["role", label])
            total: Counter[str] = Counter()
            for s in self._stats:
                total.update(getattr(s, attr))
            for key, value in sorted(total.items()):
                family.add_metric([self._role, key], value)
            return family

        def plain(name: str, doc: str, attr: str) -> CounterMetricFamily:
            family = CounterMetricFamily(name, doc, labels=["role"])
            family.add_metric([self._role], sum(getattr(s, attr) for s in self._stats))
            return family

        yield by_label(PUTS_TOTAL, "Embeddings stored, by offered path", "puts", "path")
        yield by_label(FETCHES_TOTAL, "Embeddings read, by path used", "fetches", "path")
        yield by_label(FETCH_BYTES_TOTAL, "Embedding bytes read", "fetch_bytes", "path")
        yield by_label(ERRORS_TOTAL, "Failed embedding transfers", "errors", "error")
        yield plain(POOL_FALLBACKS_TOTAL, "Pool full, item offered by stream", "pool_fallbacks")
        yield plain(OPEN_FALLBACKS_TOTAL, "Pool not openable, item streamed", "open_fallbacks")
        yield plain(ACKS_TOTAL, "Acks naming a live embedding", "acks")
        yield plain(RELEASED_TOTAL, "Embeddings freed by their last ack", "released")
        yield plain(EXPIRED_TOTAL, "Embeddings freed by TTL", "expired")
        for name in (
            POOL_USED_BYTES,
            POOL_CAPACITY_BYTES,
            SPILLED_BYTES,
            POOLS_OPEN,
            DEVICE_HELD_BYTES,
        ):
            gauge = GaugeMetricFamily(name, name.replace("_", " "), labels=["role"])
            values = [s.gauges[name]() for s in self._stats if name in s.gauges]
            if values:
                gauge.add_metric([self._role], sum(values))
                yield gauge
