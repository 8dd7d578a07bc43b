"""Settings of ``order-pipeline``, layered by servicekit.config (flags > env > TOML)."""

from __future__ import annotations

from typing import Annotated

import msgspec

from schemas.names import DEFAULT_SHARDS
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
from servicekit.credentials import one_secret, url_with_password, urls_with_password
from servicekit.redis_clients import check_sentinel_settings

from .regions import parse_region_apis

DEFAULT_STEPS = "validate,reserve,pay,fulfil"


class PipelineConfig(ServiceConfig, frozen=True, kw_only=True):
    """Everything a worker process and the orders API need.

    ``steps`` is a comma-separated list of registered step names, or
    ``module:attribute`` paths of step factories, run in that order.
    """

    mqtt_url: Annotated[
        str,
        doc(
            "Broker the workers publish statuses to and take status queries and health "
            "reports from, mqtt://[user@]host[:port] or mqtts:// for TLS, the password in "
            "--mqtt-password-file; several brokers of the region comma-separated (statuses go "
            "to each)"
        ),
    ] = "mqtt://127.0.0.1:1883"
    mqtt_password: MqttPassword = ""
    mqtt_password_file: MqttPasswordFile = ""
    mqtt_ca_file: MqttCaFile = ""
    redis_url: Annotated[
        str,
        doc(
            "Redis holding the order streams, records and stock, redis://[user@]host:port/db or "
            "rediss:// for TLS (any node's URL with --redis-cluster), the password in "
            "--redis-password-file"
        ),
    ] = "redis://127.0.0.1:6379/0"
    redis_password: RedisPassword = ""
    redis_password_file: Annotated[
        str,
        doc(
            "File holding the Redis password of --redis-url's user on one line (keep it 0600); "
            "set it whenever Redis has ACL users, never put the password in the URL flag"
        ),
    ] = ""
    redis_cluster: RedisCluster = False
    redis_sentinel: RedisSentinel = ()
    redis_sentinel_master: RedisSentinelMaster = ""
    http_port: Annotated[
        int,
        doc(
            "TCP port of the orders API, the ops page, /metrics and /healthz (`run` only); "
            "change it when the port is taken or several APIs share a host"
        ),
    ] = 8082
    http_host: Annotated[
        str,
        doc(
            "Address the orders API listens on; loopback needs no tokens, any other address "
            "(0.0.0.0 in a container) needs --api-tokens-file or --api-tokens"
        ),
    ] = "127.0.0.1"
    api_tokens_file: Annotated[
        str,
        doc(
            "File of orders API bearer tokens, one `role sha256:HEX [name]` line each (made by "
            "`order-pipeline token new`); set it whenever the API listens off loopback"
        ),
    ] = ""
    api_tokens: Annotated[
        str,
        doc(
            "Orders API token entries as in --api-tokens-file, separated by `;`, added to the "
            "file's; for a container that gets them from its environment"
        ),
    ] = ""
    shards: Annotated[
        int,
        doc(
            "Order streams to read, one per shard; one count per deployment, kept in Redis "
            "(deployment:manifest): left unset, the deployment's is adopted, another refuses "
            "to start; `layout set` changes it"
        ),
    ] = DEFAULT_SHARDS
    workers: Annotated[
        int,
        doc(
            "Worker processes `run` starts and restarts beside the API; raise for more "
            "throughput on more cores, 0 serves the API alone"
        ),
    ] = 1
    consumer: Annotated[
        str,
        doc(
            "Consumer name of a `worker` in the streams' consumer group; leave empty for "
            "HOSTNAME-PID, unique per process (`run` names its workers so)"
        ),
    ] = ""
    steps: Annotated[
        str,
        doc(
            "Comma-separated steps every order goes through, built-in names or "
            "module:factory paths, in order; change it to add or replace a business step"
        ),
    ] = DEFAULT_STEPS
    batch_size: Annotated[
        int,
        doc(
            "Most stream entries a worker reads (or reclaims) per shard at once and settles as "
            "one batch; raise for throughput under a backlog, lower for shorter batches"
        ),
    ] = 100
    batch_linger_ms: Annotated[
        float,
        msgspec.Meta(ge=0),
        doc(
            "Milliseconds a busy worker waits before its next read after a batch smaller than "
            "--batch-size, so the next batch carries more orders (less CPU per order); a worker "
            "woken from idle never waits; 0 reads at once"
        ),
    ] = 5.0
    block_ms: Annotated[
        int,
        doc(
            "Milliseconds a read waits for new orders when every shard is empty (XREADGROUP "
            "BLOCK); higher means fewer idle round trips (a stop cuts the wait short)"
        ),
    ] = 5_000
    idle_poll_ms: Annotated[
        int,
        doc(
            "Redis Cluster only: milliseconds between reads while every shard is empty (a "
            "worker cannot block on several slots); lower for latency, raise to idle cheaper"
        ),
    ] = 10
    claim_idle_ms: Annotated[
        int,
        doc(
            "Milliseconds an entry may sit unacked with a consumer before another worker "
            "reclaims it (a crashed worker's orders); keep above the slowest batch"
        ),
    ] = 30_000
    claim_every_ms: Annotated[
        int,
        doc(
            "Milliseconds between a worker's looks for entries to reclaim (XAUTOCLAIM, one per "
            "shard); lower recovers a crashed worker's orders sooner, for more Redis calls"
        ),
    ] = 5_000
    max_deliveries: Annotated[
        int,
        doc(
            "Deliveries of one entry (first read plus reclaims) before it goes to the DLQ with "
            "its last error; raise if steps fail transiently for long"
        ),
    ] = 5
    dead_consumer_idle_ms: Annotated[
        int,
        doc(
            "Milliseconds after which a consumer that holds no entries is removed from the "
            "group (each worker process is a new consumer); lower on churning hosts"
        ),
    ] = 3_600_000
    gateway_latency_ms: Annotated[
        float,
        doc(
            "Simulated payment gateway: milliseconds each charge takes; set it in load tests "
            "to model a real gateway's latency"
        ),
    ] = 0.0
    gateway_failure_rate: Annotated[
        float,
        doc(
            "Simulated payment gateway: fraction 0..1 of charges that fail transiently and are "
            "retried (up to --payment-attempts); set it to exercise retries"
        ),
    ] = 0.0
    gateway_decline_rate: Annotated[
        float,
        doc(
            "Simulated payment gateway: fraction 0..1 of charges declined for good, the order "
            "ending failed; set it to exercise declines"
        ),
    ] = 0.0
    gateway_seed: Annotated[
        int,
        doc(
            "Simulated payment gateway: seed of its failures and declines, so a run can be "
            "repeated; change it for a different draw"
        ),
    ] = 0
    payment_attempts: Annotated[
        int,
        doc(
            "Charges tried per order while the gateway fails transiently before the order ends "
            "failed; raise for a flaky gateway"
        ),
    ] = 3
    payment_backoff_ms: Annotated[
        float,
        doc(
            "Milliseconds of the first wait between charge attempts, growing with jitter after; "
            "raise to go easier on a struggling gateway"
        ),
    ] = 50.0
    status_ack_timeout_s: Annotated[
        float,
        doc(
            "Seconds a status-query answer waits for the broker's PUBACKs before the query is "
            "acked anyway (the device asks again); order processing never waits on the broker"
        ),
    ] = 5.0
    status_backlog_max: Annotated[
        int,
        doc(
            "Statuses a worker keeps for the broker while it is down or slow (about 0.5 KB "
            "each); past it new ones are only counted in pipeline_statuses_unpublished_total "
            "and devices get them by status query"
        ),
    ] = 10_000
    status_query_window: Annotated[
        int,
        doc(
            "Devices' status queries a worker holds unanswered at once (its MQTT Receive "
            "Maximum); raise if many devices recover statuses at the same time"
        ),
    ] = 100
    status_query_device_per_min: Annotated[
        float,
        msgspec.Meta(ge=0),
        doc(
            "Status queries (up to 100 ids each) one device may send a worker a minute; "
            "past it they are shed unanswered and counted in "
            "pipeline_device_throttled_total, and the device asks again; 0: no limit"
        ),
    ] = 60.0
    health_device_per_min: Annotated[
        float,
        msgspec.Meta(ge=0),
        doc(
            "Health messages (reports and Wills) one device may send a worker a minute; past "
            "it they are shed unwritten and counted in pipeline_device_throttled_total; keep "
            "above what an agent sends (one a second at most while a figure flaps, plus its "
            "interval reports); 0: no limit"
        ),
    ] = 90.0
    health_clock_tolerance_s: Annotated[
        float,
        msgspec.Meta(gt=0),
        doc(
            "Seconds a health message's time may be ahead of the worker's clock (a report's, "
            "also behind it beyond --health-ttl-s); outside it is refused as at_in_future or "
            "at_too_old"
        ),
    ] = 3600.0
    shutdown_grace_s: Annotated[
        float,
        doc(
            "Seconds a stopping worker may spend on the batch in hand before it is cancelled "
            "(its entries are reclaimed later); keep below the stop timeout"
        ),
    ] = 10.0
    backoff_max_s: Annotated[
        float,
        doc(
            "Cap in seconds of every retry wait: after a Redis outage a worker is back within "
            "about this long, however long it lasted; raise to go easier on Redis"
        ),
    ] = 1.0
    retention_days: Annotated[
        float,
        doc(
            "Days a finished order (fulfilled, rejected, failed) is kept: record, history, "
            "reservation and index entries; 0 keeps them for ever"
        ),
    ] = 30.0
    health_stale_s: Annotated[
        float,
        doc(
            "Seconds after its last health report that the ops page shows a device stale; keep "
            "above the agents' health_interval_s"
        ),
    ] = 900.0
    health_ttl_s: Annotated[
        float,
        doc(
            "Seconds a silent device stays in the fleet health view before it is dropped; "
            "raise to keep long-offline devices listed"
        ),
    ] = 86400.0
    otlp_endpoint: OtlpEndpoint = ""
    trace_sample_ratio: TraceSampleRatio = 1.0

    region: Annotated[
        str,
        doc(
            "Geo mode: this region's name; with --region-api, an order not found here is "
            "looked up in the other regions' APIs; empty runs single-region"
        ),
    ] = ""
    region_api: Annotated[
        tuple[str, ...],
        doc(
            "Geo mode: another region's orders API as NAME=URL, one per region, asked for "
            "orders this region does not hold"
        ),
    ] = ()
    region_api_allow_http: Annotated[
        bool,
        doc(
            "Geo mode: accept http:// --region-api URLs (refused by default); lookups then "
            "cross the link in clear and without the caller's bearer token, so turn it on only "
            "for a private link or a test"
        ),
    ] = False
    region_api_timeout_s: Annotated[
        float,
        doc(
            "Geo mode: seconds the other regions' APIs get to answer a lookup before the "
            "client gets 503 region-unavailable; raise for distant regions"
        ),
    ] = 2.0

    def with_secret_files(self) -> PipelineConfig:
        """The settings with the password files read into the URLs (see ServiceConfig).

        The worker processes get the result through their environment, never argv.
        """
        mqtt = one_secret(self.mqtt_password, self.mqtt_password_file, "mqtt_password")
        redis = one_secret(self.redis_password, self.redis_password_file, "redis_password")
        return msgspec.structs.replace(
            self,
            mqtt_url=urls_with_password(self.mqtt_url, mqtt, "mqtt_url"),
            redis_url=url_with_password(self.redis_url, redis, "redis_url"),
            mqtt_password="",
            mqtt_password_file="",
            redis_password="",
            redis_password_file="",
        )

    def __post_init__(self) -> None:
        # A ValueError here becomes a ConfigError at start (msgspec ValidationError).
        parse_region_apis(self.region, self.region_api, allow_http=self.region_api_allow_http)
        check_sentinel_settings(
            self.redis_sentinel, self.redis_sentinel_master, cluster=self.redis_cluster
        )
        if self.region_api_timeout_s <= 0:
            raise ValueError("region_api_timeout_s must be > 0")
        if self.status_backlog_max < 1:
            raise ValueError("status_backlog_max must be >= 1")
