"""Prometheus metrics of one encoder replica.

Contract: ``EncoderMetrics`` owns a private ``CollectorRegistry`` (several servers may live in one
test process) with the series below; ``serve_http(port)`` exposes it. Names follow the ``vlm:``
prefix shared by all Glimpse services; labels are low-cardinality (modality, reason, code), never
request ids or URLs. images/s is ``rate(vlm:mm_items_total{modality="image"}[1m])``.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from encoder_service.batcher import BatchStats

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_PATCH_BUCKETS = (256, 1024, 4096, 8192, 16384, 32768, 65536, 131072, 262144)


class EncoderMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.queue_depth = Gauge(
            "vlm:encoder_queue_depth", "Items waiting for the vision tower", registry=r
        )
        self.inflight = Gauge(
            "vlm:encoder_inflight_items", "Items being fetched, decoded or encoded", registry=r
        )
        self.encode_latency = Histogram(
            "vlm:encoder_latency_seconds",
            "Per-item time from request arrival to embedding ready",
            ["modality"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.items = Counter(
            "vlm:mm_items", "Items encoded (cache hits included)", ["modality"], registry=r
        )
        self.cache_queries = Counter("vlm:mm_cache_queries", "Embedding cache lookups", registry=r)
        self.cache_hits = Counter("vlm:mm_cache_hits", "Embedding cache hits", registry=r)
        self.fetch_seconds = Histogram(
            "vlm:media_fetch_seconds",
            "Time to obtain media bytes (download, data: decode, file read)",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.item_errors = Counter(
            "vlm:mm_item_errors", "Items that failed, by error kind", ["reason"], registry=r
        )
        self.vit_forwards = Counter(
            "vlm:encoder_vit_forwards", "Vision tower forwards (batches)", registry=r
        )
        self.vit_seconds = Histogram(
            "vlm:encoder_vit_seconds",
            "Wall time of one vision tower forward",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.vit_batch_patches = Histogram(
            "vlm:encoder_vit_batch_patches",
            "Patches packed into one vision tower forward",
            buckets=_PATCH_BUCKETS,
            registry=r,
        )
        self.store_bytes = Gauge(
            "vlm:encoder_store_bytes", "Bytes of embeddings waiting for fetch/ack", registry=r
        )
        self.rpcs = Counter(
            "vlm:encoder_rpcs",
            "Finished RPCs by method and status code",
            ["method", "code"],
            registry=r,
        )

    def bind_queue_depth(self, depth: Callable[[], float]) -> None:
        self.queue_depth.set_function(depth)

    def bind_store_bytes(self, used: Callable[[], float]) -> None:
        self.store_bytes.set_function(used)

    def observe_batch(self, stats: BatchStats) -> None:
        self.vit_forwards.inc()
        self.vit_seconds.observe(stats.seconds)
        self.vit_batch_patches.observe(stats.patches)

    def serve_http(self, port: int, host: str = "0.0.0.0") -> None:
        start_http_server(port, addr=host, registry=self.registry)

    def value(self, name: str, labels: dict[str, str] | None = None) -> float:
        """Current value of a sample (tests and logs); 0.0 when absent."""
        found = self.registry.get_sample_value(name, labels or {})
        return 0.0 if found is None else float(found)
