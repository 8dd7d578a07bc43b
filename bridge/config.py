"""The bridge's settings: one frozen Struct, filled by :func:`servicekit.config.load_config`."""

from __future__ import annotations

import socket
from typing import Annotated, Final

import msgspec

from schemas.ids import is_region_name
from schemas.names import DEDUP_TTL_S, DEFAULT_SHARDS, DEFAULT_SHARE_GROUP
from servicekit.config import ServiceConfig

Positive = Annotated[int, msgspec.Meta(ge=1)]
NonNegative = Annotated[float, msgspec.Meta(ge=0)]
# The agents' default resend horizon (edge_agent resend_max_age_s): an order older than this
# is never resent, so a dedup marker must outlive it.
AGENT_RETRY_HORIZON_S: Final = 6 * 24 * 3600.0


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
    # PUBACK only once WAIT saw this many replicas hold the batch (single primary only).
    redis_min_replicas: Annotated[int, msgspec.Meta(ge=0)] = 0
    redis_replica_timeout_ms: Positive = 1000
    # /readyz is red unless Redis fsyncs its AOF before every reply (appendfsync always).
    redis_require_durable: bool = True
    # The ACL hides CONFIG GET: trust the operator that appendfsync is `always`.
    redis_assume_fsync_always: bool = False
    shards: Positive = DEFAULT_SHARDS
    client_id: str = msgspec.field(default_factory=default_client_id)
    share_group: str = DEFAULT_SHARE_GROUP
    # Loopback unless told otherwise: /metrics and /readyz leak load and topology.
    # Containers set ORDERS_HTTP_HOST=0.0.0.0 so the scraper can reach them.
    http_host: str = "127.0.0.1"
    http_port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 9102
    # Mosquitto keeps a dead replica's share this long; agents resend after it.
    session_expiry_s: Positive = 3600
    mqtt_keepalive_s: Positive = 30
    # MQTT 5 Maximum Packet Size we accept: the 16 KiB order cap + topic + properties.
    mqtt_max_packet_size: Positive = 20480
    # MQTT 5 Receive Maximum: unacked messages the broker may hand us at once.
    # Acking after the write makes this the cap on in-flight work and batch size.
    receive_maximum: Annotated[int, msgspec.Meta(ge=1, le=65535)] = 1000
    batch_max: Positive = 500
    # Group commit: an idle bridge writes at once; only a batch that follows a full one
    # waits up to this long to fill (bridge/batcher.py).
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
    # Cap of every retry wait: after an outage the bridge is back within about this long.
    backoff_max_s: Annotated[float, msgspec.Meta(gt=0)] = 1.0
    drain_grace_s: NonNegative = 10.0
    # Readiness heartbeat in Redis for the ops page (bridge/heartbeat.py); 0 turns it off.
    heartbeat_interval_s: NonNegative = 5.0
    # Tracing (servicekit.tracing): off without an OTLP/HTTP endpoint.
    otlp_endpoint: str = ""
    trace_sample_ratio: Annotated[float, msgspec.Meta(ge=0, le=1)] = 1.0

    # The longest an agent may resend an order it already delivered. The dedup marker must
    # outlive it, or a late resend is appended a second time: a shorter TTL is refused.
    agent_retry_horizon_s: NonNegative = AGENT_RETRY_HORIZON_S

    # Geo mode (GEO.md): this region's name and every region's Redis, NAME=REDIS_URL,
    # this one included (its entry replaces redis_url). Empty: single-region, as before.
    region: str = ""
    region_redis: tuple[str, ...] = ()
    # A write into another region's Redis gives up after this long: the device gets `pending`.
    region_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 1.0
    # Batches in flight at once per remote region (the local writer keeps one).
    region_write_concurrency: Positive = 4
    # Circuit breaker per remote region: open after this many failed writes in a row,
    # stay open this long (orders for it answer `pending` at once), then try one batch.
    region_breaker_failures: Positive = 3
    region_breaker_open_s: Annotated[float, msgspec.Meta(gt=0)] = 5.0

    def __post_init__(self) -> None:
        # msgspec turns a ValueError here into a ValidationError (ConfigError at start).
        if self.dedup_ttl_s <= self.agent_retry_horizon_s:
            raise ValueError(
                f"dedup_ttl_s ({self.dedup_ttl_s}) must be longer than agent_retry_horizon_s "
                f"({self.agent_retry_horizon_s:g}): a marker that expires while agents may "
                "still resend lets an order be appended twice"
            )
        self.region_urls()  # raises ValueError on a bad region setting

    @property
    def geo(self) -> bool:
        """True in geo mode (``--region`` given)."""
        return bool(self.region)

    def region_urls(self) -> dict[str, str]:
        """Every region's Redis URL by name (empty outside geo mode).

        Raises:
            ValueError: a malformed entry, a name twice, or region flags without ``--region``.
        """
        if not self.region:
            if self.region_redis:
                raise ValueError("region_redis needs region (the name of this region)")
            return {}
        if not is_region_name(self.region):
            raise ValueError(f"region {self.region!r} is not 1-32 chars of [a-z0-9-]")
        urls: dict[str, str] = {}
        for entry in self.region_redis:
            name, sep, url = entry.partition("=")
            if not sep or not is_region_name(name) or not url.startswith(("redis", "unix")):
                raise ValueError(f"region_redis {entry!r} is not NAME=redis://…")
            if name in urls:
                raise ValueError(f"region_redis names {name!r} twice")
            urls[name] = url
        urls.setdefault(self.region, self.redis_url)
        return urls

    @property
    def local_redis_url(self) -> str:
        """The Redis this bridge writes its own region's orders to."""
        return self.region_urls().get(self.region, self.redis_url)
