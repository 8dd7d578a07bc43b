"""Settings of ``order-pipeline``, layered by servicekit.config (flags > env > TOML)."""

from __future__ import annotations

from typing import Annotated

import msgspec

from schemas.names import DEFAULT_SHARDS
from servicekit.config import ServiceConfig

from .regions import parse_region_apis

DEFAULT_STEPS = "validate,reserve,pay,fulfil"


class PipelineConfig(ServiceConfig, frozen=True, kw_only=True):
    """Everything a worker process and the orders API need.

    ``steps`` is a comma-separated list of registered step names, or
    ``module:attribute`` paths of step factories, run in that order.
    """

    mqtt_url: str = "mqtt://127.0.0.1:1883"
    # CA bundle for an mqtts:// broker with a private CA; empty: the system's.
    mqtt_ca_file: str = ""
    redis_url: str = "redis://127.0.0.1:6379/0"
    # A Redis Cluster (any node's URL): keys are hash-tagged per shard either way.
    redis_cluster: bool = False
    http_port: int = 8082
    http_host: str = "127.0.0.1"
    # Orders API bearer tokens (pipeline.api_tokens): a file of `role sha256:<hex> [name]`
    # lines and/or the same entries separated by `;`. Required off loopback.
    api_tokens_file: str = ""
    api_tokens: str = ""
    shards: int = DEFAULT_SHARDS
    workers: int = 1
    consumer: str = ""  # consumer name; default derived from host name and pid
    steps: str = DEFAULT_STEPS
    batch_size: int = 100
    block_ms: int = 500
    # Redis Cluster only: a worker cannot block on streams of several slots at once;
    # while every shard is empty it polls them again after this pause.
    idle_poll_ms: int = 10
    claim_idle_ms: int = 30_000
    claim_every_ms: int = 1_000
    max_deliveries: int = 5
    dead_consumer_idle_ms: int = 3_600_000  # forget consumers idle this long holding nothing
    gateway_latency_ms: float = 0.0
    gateway_failure_rate: float = 0.0  # transient failures, retried
    gateway_decline_rate: float = 0.0  # permanent refusals: the order ends `failed`
    gateway_seed: int = 0
    payment_attempts: int = 3
    payment_backoff_ms: float = 50.0
    status_ack_timeout_s: float = 5.0
    # Status queries held unanswered at once (our MQTT Receive Maximum).
    status_query_window: int = 100
    shutdown_grace_s: float = 10.0
    # Cap of every retry wait (servicekit.backoff): after an outage the worker is back
    # within about this long, however long the outage lasted.
    backoff_max_s: float = 1.0
    # Terminal orders (fulfilled, rejected, failed) expire this long after they end:
    # record, history, reservation and index entries. 0 keeps them for ever.
    retention_days: float = 30.0
    # The ops page counts a device stale when its last health report is older than this.
    health_stale_s: float = 90.0
    # Fleet health (pipeline/health.py): a device silent this long leaves the view.
    health_ttl_s: float = 86400.0
    # Tracing (servicekit.tracing): off without an OTLP/HTTP endpoint.
    otlp_endpoint: str = ""
    trace_sample_ratio: Annotated[float, msgspec.Meta(ge=0, le=1)] = 1.0

    # Geo mode (GEO.md, pipeline/regions.py): this region's name and the other regions'
    # orders APIs, NAME=URL (repeatable); an order not found here is looked up there.
    region: str = ""
    region_api: tuple[str, ...] = ()
    region_api_timeout_s: float = 2.0

    def __post_init__(self) -> None:
        # A ValueError here becomes a ConfigError at start (msgspec ValidationError).
        parse_region_apis(self.region, self.region_api)
        if self.region_api_timeout_s <= 0:
            raise ValueError("region_api_timeout_s must be > 0")
