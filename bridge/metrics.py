"""Prometheus metrics of one bridge, in a registry of its own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from servicekit.mqtt import MqttMetrics

_BATCH_SIZES = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)
_SECONDS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class BridgeMetrics:
    """The counters, gauges and histograms ``/metrics`` serves."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.received = Counter("bridge_received", "MQTT messages received", registry=r)
        self.accepted = Counter("bridge_accepted", "orders appended to a stream", registry=r)
        self.duplicates = Counter("bridge_duplicates", "orders already stored", registry=r)
        self.rejected = Counter(
            "bridge_rejected", "messages rejected, by reason", ["reason"], registry=r
        )
        self.throttled = Counter(
            "bridge_device_throttled",
            "messages shed because their device was over its budget, by topic kind",
            ["topic"],
            registry=r,
        )
        self.dlq_shed = Counter(
            "bridge_dlq_shed",
            "dead letters counted and receipted but not stored: their device was over its "
            "DLQ budget, by reason",
            ["reason"],
            registry=r,
        )
        self.dlq_maxlen = Gauge(
            "bridge_dlq_maxlen", "entries orders:dlq keeps (from the byte budget)", registry=r
        )
        self.batch_size = Histogram(
            "bridge_batch_size", "messages per Redis batch", buckets=_BATCH_SIZES, registry=r
        )
        self.batch_latency = Histogram(
            "bridge_batch_latency_seconds",
            "from a batch's first message to its write, retries included",
            buckets=_SECONDS,
            registry=r,
        )
        self.redis_rtt = Histogram(
            "bridge_redis_rtt_seconds", "one Redis round trip", buckets=_SECONDS, registry=r
        )
        self.redis_errors = Counter("bridge_redis_errors", "failed Redis round trips", registry=r)
        self.receipts_failed = Counter(
            "bridge_receipts_failed", "receipts that could not be published", registry=r
        )
        self.in_flight = Gauge(
            "bridge_in_flight", "messages received and not yet acknowledged", registry=r
        )
        self.redis_up = Gauge("bridge_redis_up", "1 when the last Redis call worked", registry=r)
        self.redis_durable = Gauge(
            "bridge_redis_durable",
            "1 when Redis fsyncs its AOF before every reply (appendfsync always); "
            "0 when not; -1 when the ACL hides appendfsync",
            registry=r,
        )
        self.redis_full = Gauge(
            "bridge_redis_full", "1 while Redis answers OOM (at maxmemory)", registry=r
        )
        self.redis_auth_ok = Gauge(
            "bridge_redis_auth_ok", "0 while Redis refuses our credentials", registry=r
        )
        self.redis_auth_ok.set(1)
        self.ready = Gauge(
            "bridge_ready", "1 while every /readyz check passes (read at scrape time)", registry=r
        )
        self.mqtt_up = Gauge("bridge_mqtt_up", "1 while connected to the broker", registry=r)
        self.mqtt = MqttMetrics("bridge", registry=r)
