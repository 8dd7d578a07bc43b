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
            "publishes dropped unsent: larger than the broker allows",
            **kwargs,
        )
        self.publish_queue_full = Counter(
            f"{prefix}_mqtt_publish_queue_full",
            "publishes refused (QueueFull raised to the caller): max_queued already waiting",
            **kwargs,
        )
        self.receive_maximum_exceeded = Counter(
            f"{prefix}_mqtt_receive_maximum_exceeded",
            "connections we closed (DISCONNECT 0x93) because the broker sent past our Receive "
            "Maximum and more than PARKED_DISCONNECT_BYTES",
            **kwargs,
        )
