"""The bridge's settings: one frozen Struct, filled by :func:`servicekit.config.load_config`."""

from __future__ import annotations

import socket
from typing import Annotated, Final

import msgspec

from schemas.ids import is_region_name
from schemas.names import DEDUP_TTL_S, DEFAULT_SHARDS, DEFAULT_SHARE_GROUP
from servicekit.config import (
    MqttCaFile,
    MqttPassword,
    MqttPasswordFile,
    OtlpEndpoint,
    RedisCluster,
    RedisPassword,
    RedisSentinel,
    RedisSentinelMaster,
    ServiceConfig,
    TraceSampleRatio,
    doc,
)
from servicekit.credentials import (
    entries_with_password,
    one_secret,
    url_with_password,
    urls_with_password,
)
from servicekit.redis_clients import check_sentinel_settings

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

    mqtt_url: Annotated[
        str,
        doc(
            "Broker the bridge takes orders from, mqtt://[user@]host[:port] or mqtts:// for "
            "TLS; set it to your broker and its bridge service account, the password in "
            "--mqtt-password-file; several brokers of the region comma-separated (a shared "
            "subscription on each)"
        ),
    ] = "mqtt://127.0.0.1:1883"
    mqtt_password: MqttPassword = ""
    mqtt_password_file: MqttPasswordFile = ""
    mqtt_ca_file: MqttCaFile = ""
    redis_url: Annotated[
        str,
        doc(
            "Redis the orders are written to, redis://[user@]host:port/db or rediss:// for TLS "
            "(any node's URL with --redis-cluster), the password in --redis-password-file; in "
            "geo mode --region-redis may replace it for this region"
        ),
    ] = "redis://127.0.0.1:6379/0"
    redis_password: RedisPassword = ""
    redis_password_file: Annotated[
        str,
        doc(
            "File holding the Redis password of --redis-url's user on one line (keep it 0600), "
            "also used by each --region-redis URL without one; set it whenever Redis has ACL "
            "users"
        ),
    ] = ""
    redis_cluster: RedisCluster = False
    redis_sentinel: RedisSentinel = ()
    redis_sentinel_master: RedisSentinelMaster = ""
    redis_min_replicas: Annotated[
        int,
        msgspec.Meta(ge=0),
        doc(
            "Replicas that must hold a batch (Redis WAIT) before its orders are PUBACKed and "
            "receipted; raise to survive the loss of the primary, 0 trusts the primary's fsync "
            "alone"
        ),
    ] = 0
    redis_replica_timeout_ms: Annotated[
        Positive,
        doc(
            "Milliseconds WAIT gives the replicas of --redis-min-replicas; a batch they do not "
            "confirm in time is retried, so raise it if replicas lag under load"
        ),
    ] = 1000
    redis_require_durable: Annotated[
        bool,
        doc(
            "Keep /readyz red unless Redis fsyncs its AOF before every reply (appendfsync "
            "always); turn off only for throwaway test setups that accept losing orders"
        ),
    ] = True
    redis_assume_fsync_always: Annotated[
        bool,
        doc(
            "Count Redis as durable when its ACL hides CONFIG GET, so the bridge cannot check "
            "appendfsync itself; turn on once you have checked it is `always`"
        ),
    ] = False
    shards: Annotated[
        Positive,
        doc(
            "Order streams the orders are spread over by device; one count per deployment, "
            "kept in Redis (deployment:manifest): left unset, the deployment's is adopted, "
            "another refuses to start; change it with `order-pipeline layout set`"
        ),
    ] = DEFAULT_SHARDS
    client_id: Annotated[
        str,
        doc(
            "MQTT client id, which names this replica's persistent session and heartbeat; "
            "give each replica its own id that survives restarts, so a restart resumes it",
            default="order-bridge-HOSTNAME",
        ),
    ] = msgspec.field(default_factory=default_client_id)
    share_group: Annotated[
        str,
        doc(
            "MQTT shared-subscription group the replicas split the orders in "
            "($share/GROUP/…); only change it to run two separate bridge fleets on one broker"
        ),
    ] = DEFAULT_SHARE_GROUP
    http_host: Annotated[
        str,
        doc(
            "Address of /metrics, /healthz and /readyz; loopback keeps load and topology "
            "private, set 0.0.0.0 in a container so the scraper and probes reach it"
        ),
    ] = "127.0.0.1"
    http_port: Annotated[
        int,
        msgspec.Meta(ge=0, le=65535),
        doc(
            "TCP port of /metrics, /healthz and /readyz; change it when two replicas share a "
            "host, 0 picks a free port"
        ),
    ] = 9102
    session_expiry_s: Annotated[
        Positive,
        doc(
            "Seconds the broker keeps a stopped replica's session and its unacked orders; "
            "raise it to cover your longest restart or upgrade of a replica"
        ),
    ] = 3600
    mqtt_keepalive_s: Annotated[
        Positive,
        doc(
            "MQTT keepalive in seconds: how soon a dead connection to the broker is noticed; "
            "lower to fail over faster, raise on a slow or metered link"
        ),
    ] = 30
    mqtt_max_packet_size: Annotated[
        Positive,
        doc(
            "Largest MQTT packet in bytes the bridge accepts (MQTT 5 Maximum Packet Size): the "
            "16 KiB order cap plus topic and properties; raise only with the order cap"
        ),
    ] = 20480
    receive_maximum: Annotated[
        int,
        msgspec.Meta(ge=1, le=65535),
        doc(
            "Orders the broker may hand this replica before it acks (MQTT 5 Receive Maximum): "
            "the cap on in-flight work and so on batch size; raise with --batch-max for more "
            "throughput per replica"
        ),
    ] = 1000
    batch_max: Annotated[
        Positive,
        doc(
            "Most orders written to Redis in one round trip; larger batches cost less per order "
            "under heavy load, keep it at or below --receive-maximum"
        ),
    ] = 500
    batch_delay_ms: Annotated[
        NonNegative,
        doc(
            "Milliseconds a batch that follows a full one waits to fill up (an idle bridge "
            "writes at once); raise for fewer, fuller writes under a backlog, 0 never waits"
        ),
    ] = 5.0
    dedup_ttl_s: Annotated[
        Positive,
        doc(
            "Seconds the dedup marker of an order lives in Redis, so a resend is answered "
            "duplicate; must exceed --agent-retry-horizon-s, raise both together"
        ),
    ] = DEDUP_TTL_S
    trim_every_batches: Annotated[
        int,
        msgspec.Meta(ge=0),
        doc(
            "Trim a shard stream below what every consumer group has read once per this many "
            "batches written to it; raise to trim less often, 0 turns trimming off"
        ),
    ] = 100
    dlq_maxlen: Annotated[
        Positive,
        doc(
            "Most entries in the dead-letter stream orders:dlq, oldest dropped first; the "
            "byte budget (--dlq-max-bytes) usually caps it lower"
        ),
    ] = 1_000_000
    dlq_max_bytes: Annotated[
        int,
        msgspec.Meta(ge=0),
        doc(
            "Bytes orders:dlq may hold (entries of up to about 17 KB each, oldest dropped "
            "first); 0 takes a 32nd of Redis maxmemory, or 64 MiB when maxmemory is unknown"
        ),
    ] = 0
    dlq_device_burst: Annotated[
        Positive,
        doc(
            "Dead letters one device may have stored at once; past it and --dlq-device-per-min "
            "its rejected messages are receipted and counted (bridge_dlq_shed_total), not stored"
        ),
    ] = 10
    dlq_device_per_min: Annotated[
        NonNegative,
        doc(
            "Dead letters per minute one device may have stored after its burst; 0 stores none "
            "past the burst"
        ),
    ] = 1.0
    rate_per_s: Annotated[
        NonNegative,
        doc(
            "Orders per second each device may send (token bucket; more are receipted "
            "rate_limited and resent later); raise for busy devices, 0 turns the limit off"
        ),
    ] = 50.0
    rate_burst: Annotated[
        Positive,
        doc(
            "Orders a device may send at once above --rate-per-s (the bucket size), e.g. a "
            "backlog after an outage; raise if reconnecting devices get rate_limited"
        ),
    ] = 1000
    redis_timeout_s: Annotated[
        float,
        msgspec.Meta(gt=0),
        doc(
            "Seconds to connect to Redis or wait for a reply before the round trip counts as "
            "failed and is retried; raise for a slow or distant Redis"
        ),
    ] = 5.0
    backoff_max_s: Annotated[
        float,
        msgspec.Meta(gt=0),
        doc(
            "Cap in seconds of every retry wait (Redis writes, MQTT reconnects): after an "
            "outage the bridge is back within about this long; raise to go easier on a "
            "struggling Redis or broker"
        ),
    ] = 1.0
    drain_grace_s: Annotated[
        NonNegative,
        doc(
            "Seconds a stopping bridge spends writing and acking the orders it holds; what is "
            "left stays unacked and the broker redelivers it; keep below the stop timeout"
        ),
    ] = 10.0
    heartbeat_interval_s: Annotated[
        NonNegative,
        doc(
            "Seconds between the readiness heartbeats this replica writes to Redis for the ops "
            "page; 0 turns the heartbeat off"
        ),
    ] = 5.0
    otlp_endpoint: OtlpEndpoint = ""
    trace_sample_ratio: TraceSampleRatio = 1.0
    agent_retry_horizon_s: Annotated[
        NonNegative,
        doc(
            "Seconds agents may go on resending an order (their resend_max_age_s); a "
            "--dedup-ttl-s not above it is refused, as a late resend would be appended twice"
        ),
    ] = AGENT_RETRY_HORIZON_S

    region: Annotated[
        str,
        doc(
            "Geo mode: this region's name (1-32 of a-z, 0-9, -); empty runs single-region, "
            "set it on every bridge of a multi-region deployment"
        ),
    ] = ""
    region_redis: Annotated[
        tuple[str, ...],
        doc(
            "Geo mode: another region's Redis as NAME=REDIS_URL, one per region; orders whose "
            "authority is that region are written there (an entry for this region replaces "
            "--redis-url)"
        ),
    ] = ()
    region_timeout_s: Annotated[
        float,
        msgspec.Meta(gt=0),
        doc(
            "Geo mode: seconds a write into another region's Redis may take before the device "
            "is answered pending and retries later; raise for distant regions"
        ),
    ] = 1.0
    region_write_concurrency: Annotated[
        Positive,
        doc(
            "Geo mode: batches in flight at once to each remote region's Redis; raise when "
            "cross-region latency limits throughput"
        ),
    ] = 4
    region_breaker_failures: Annotated[
        Positive,
        doc(
            "Geo mode: failed writes in a row that open a remote region's circuit breaker, "
            "after which its orders are answered pending at once; raise on a flaky link"
        ),
    ] = 3
    region_breaker_open_s: Annotated[
        float,
        msgspec.Meta(gt=0),
        doc(
            "Geo mode: seconds an open circuit breaker stays open before one batch tries the "
            "region again; lower to notice a recovered region sooner"
        ),
    ] = 5.0

    def __post_init__(self) -> None:
        # msgspec turns a ValueError here into a ValidationError (ConfigError at start).
        if self.dedup_ttl_s <= self.agent_retry_horizon_s:
            raise ValueError(
                f"dedup_ttl_s ({self.dedup_ttl_s}) must be longer than agent_retry_horizon_s "
                f"({self.agent_retry_horizon_s:g}): a marker that expires while agents may "
                "still resend lets an order be appended twice"
            )
        self.region_urls()  # raises ValueError on a bad region setting
        check_sentinel_settings(
            self.redis_sentinel, self.redis_sentinel_master, cluster=self.redis_cluster
        )

    def with_secret_files(self) -> BridgeConfig:
        """The settings with the password files read into the URLs (see ServiceConfig)."""
        mqtt = one_secret(self.mqtt_password, self.mqtt_password_file, "mqtt_password")
        redis = one_secret(self.redis_password, self.redis_password_file, "redis_password")
        return msgspec.structs.replace(
            self,
            mqtt_url=urls_with_password(self.mqtt_url, mqtt, "mqtt_url"),
            redis_url=url_with_password(self.redis_url, redis, "redis_url"),
            region_redis=entries_with_password(self.region_redis, redis),
            mqtt_password="",
            mqtt_password_file="",
            redis_password="",
            redis_password_file="",
        )

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
