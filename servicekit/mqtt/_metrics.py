"""Prometheus counters of one MQTT client."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter


class MqttMetrics:
    """Counters of one client, registered as ``{prefix}_mqtt_*``."""

    def __init__(self, prefix: str, registry: CollectorRegistry | None = None) -> None:
        kwargs: dict[str, Any] = {"registry": registry} if registry is not None else {}
        self.disconnects = Counter(
            f"{prefix}_mqtt_broker_disconnects",
            "DISCONNECT packets from the broker, by reason (session_taken_over: a client id clash)",
            ["reason"],
            **kwargs,
        )
        self.connections_lost = Counter(
            f"{prefix}_mqtt_connections_lost", "connections that ended, for any reason", **kwargs
        )
        self.publish_refused = Counter(
            f"{prefix}_mqtt_publish_refused",
            "QoS 1 publishes the broker answered with an error PUBACK, by reason",
            ["reason"],
            **kwargs,
        )
        self.publish_dropped = Counter(
            f"{prefix}_mqtt_publish_dropped",
            "publishes dropped unsent: queue full, or larger than the broker allows",
            **kwargs,
        )
