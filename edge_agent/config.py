"""The agent's settings: one frozen Struct, filled by flags > ``ORDERS_*`` env > TOML."""

from __future__ import annotations

from schemas import names
from schemas.messages import DeviceId
from servicekit.config import ServiceConfig
from servicekit.errors import ConfigError

from .regions import Region, parse_regions


class AgentConfig(ServiceConfig, frozen=True, kw_only=True):
    """Settings of one edge agent; see ``edge_agent/agent.toml.example``.

    Durations are in seconds, sizes in bytes. ``http_port = 0`` picks a free
    port (tests); ``http_enabled = false`` runs the Python API only (simulator).
    """

    device_id: DeviceId
    mqtt_url: str = "mqtt://127.0.0.1:1883"
    # Geo mode (edge_agent/regions.py): NAME=MQTT_URL entries, home first; replaces
    # mqtt_url when given. A TOML list, repeated --region flags, or ORDERS_REGION
    # as comma-separated entries.
    region: str | tuple[str, ...] = ()
    # Fail over after this long without a connection, or with orders in flight and no answer.
    failover_after_s: float = 60.0
    # While away from home, probe home's broker this often; go home at the first CONNACK.
    failback_probe_s: float = 30.0
    db: str = "/var/lib/edge-agent/outbox.db"
    http_host: str = "127.0.0.1"
    http_port: int = 8080
    http_enabled: bool = True
    # Extra Host names the intake answers besides localhost/127.0.0.1/[::1] (comma-separated).
    http_allowed_hosts: str = ""
    # When set, /v1/* needs `Authorization: Bearer <http_token>` (keep agent.toml 0600).
    http_token: str = ""
    # MQTT session
    client_id: str = ""  # default: edge-{device_id}
    keepalive_s: int = 30
    session_expiry_s: int = 7 * 24 * 3600
    connect_timeout_s: float = 10.0
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    # Delivery
    max_inflight: int = 100
    drain_rate_per_min: float = 6000.0
    receipt_timeout_s: float = 30.0
    rate_limited_retry_s: float = 10.0
    # A `pending` receipt (geo: the order's authority region is unreachable):
    # resend after full-jitter backoff per order, in whatever region is current.
    pending_retry_min_s: float = 5.0
    pending_retry_max_s: float = 300.0
    # Below the bridge's 7-day dedup marker TTL: older sent-but-unreceipted orders
    # are not resent (that could duplicate them) but rejected and alarmed on.
    resend_max_age_s: float = 6 * 24 * 3600.0
    reconnect_min_s: float = 0.5
    reconnect_max_s: float = 60.0
    # A transient PUBACK error (0x80, 0x83, 0x97…): resend after full-jitter backoff.
    puback_retry_min_s: float = 1.0
    puback_retry_max_s: float = 60.0
    poll_interval_s: float = 1.0
    # Device health (edge_agent/health.py) on v1/devices/{id}/health every this
    # many seconds and on change, plus an MQTT Will; 0 turns both off.
    health_interval_s: float = 30.0
    # Status recovery: an accepted order without a terminal status this long after
    # its receipt is asked about (StatusQuery), again with backoff up to
    # status_query_max_interval_s, until the status comes or status_query_max_age_s
    # (the bridge's dedup horizon) has passed since it was first sent.
    status_query_delay_s: float = 60.0
    status_query_max_interval_s: float = 3600.0
    status_query_max_age_s: float = float(names.DEDUP_TTL_S)
    # Outbox
    max_rows: int = 100_000
    max_bytes: int = 64 * 1024 * 1024
    retention_s: float = 24 * 3600.0
    prune_interval_s: float = 300.0
    storage_retry_s: float = 5.0
    batch_max: int = 1024

    def validate(self) -> None:
        """Refuse settings that would break a delivery promise; the command runs this at start.

        Raises:
            ConfigError: a bad ``region`` entry, or a resend horizon that reaches the
                bridge's dedup marker TTL (a resend after the marker expired, in any
                region, would be appended twice).
        """
        _ = self.regions
        if not 0 < self.resend_max_age_s < names.DEDUP_TTL_S:
            raise ConfigError(
                f"resend_max_age_s={self.resend_max_age_s} must be below the dedup "
                f"marker TTL ({names.DEDUP_TTL_S} s)",
                "retry_horizon_too_long",
            )
        if self.failover_after_s <= 0 or self.failback_probe_s <= 0:
            raise ConfigError("failover_after_s and failback_probe_s must be > 0")

    @property
    def regions(self) -> tuple[Region, ...]:
        """The geo regions, home first; ``()`` in single-region mode.

        Raises:
            ConfigError: a malformed ``region`` entry (see :func:`parse_regions`).
        """
        return parse_regions(self.region)

    @property
    def mqtt_client_id(self) -> str:
        """The stable MQTT client id that keeps the persistent session."""
        return self.client_id or f"edge-{self.device_id}"
