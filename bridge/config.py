"""The bridge's settings: one frozen Struct, filled by :func:`servicekit.config.load_config`."""

from __future__ import annotations

import socket
from typing import Annotated, Literal

import msgspec

from schemas.names import DEDUP_TTL_S, DEFAULT_SHARDS, DEFAULT_SHARE_GROUP
from servicekit.config import ServiceConfig

Positive = Annotated[int, msgspec.Meta(ge=1)]
NonNegative = Annotated[float, msgspec.Meta(ge=0)]


def default_client_id() -> str:
    """A stable MQTT client id for this host, so a restart resumes its session."""
    return f"order-bridge-{socket.gethostname()}"


class BridgeConfig(ServiceConfig, frozen=True, kw_only=True):
    """Settings of ``order-bridge``; each field is a flag and an ``ORDERS_*`` variable."""

    mqtt_url: str = "mqtt://127.0.0.1:1883"
    # CA bundle for an mqtts:// broker with a private CA; empty: the system's.
    mqtt_ca_file: str = ""
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_cluster: bool = False
    shards: Positive = DEFAULT_SHARDS
    client_id: str = msgspec.field(default_factory=default_client_id)
    share_group: str = DEFAULT_SHARE_GROUP
    # mqtt5: our asyncio protocol on the Rust codec; gmqtt: the library (see bridge.intake).
    mqtt_client: Literal["mqtt5", "gmqtt"] = "mqtt5"
    # Loopback unless told otherwise: /metrics and /readyz leak load and topology.
    # Containers set ORDERS_HTTP_HOST=0.0.0.0 so the scraper can reach them.
    http_host: str = "127.0.0.1"
    http_port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 9102
    # Mosquitto keeps a dead replica's share this long; agents resend after it.
    session_expiry_s: Positive = 3600
    mqtt_keepalive_s: Positive = 30
    # MQTT 5 Receive Maximum: unacked messages the broker may hand us at once.
    # Acking after the write makes this the cap on in-flight work and batch size.
    receive_maximum: Annotated[int, msgspec.Meta(ge=1, le=65535)] = 1000
    batch_max: Positive = 500
    batch_delay_ms: NonNegative = 5.0
    dedup_ttl_s: Positive = DEDUP_TTL_S
    # Trim a shard stream (MINID ~ below what every consumer group has read) once per this many
    # batches written to it; 0 turns trimming off.
    trim_every_batches: Annotated[int, msgspec.Meta(ge=0)] = 100
    dlq_maxlen: Positive = 1_000_000
    # Per-device token bucket; 0 turns the limit off.
    rate_per_s: NonNegative = 50.0
    rate_burst: Positive = 1000
    redis_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 5.0
    backoff_max_s: Annotated[float, msgspec.Meta(gt=0)] = 2.0
    drain_grace_s: NonNegative = 10.0
