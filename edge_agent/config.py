"""The agent's settings: one frozen Struct, filled by flags > ``ORDERS_*`` env > TOML."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from schemas import names
from schemas.messages import DeviceId
from servicekit.config import (
    MqttPassword,
    OtlpEndpoint,
    ServiceConfig,
    doc,
)
from servicekit.credentials import entries_with_password, one_secret, urls_with_password
from servicekit.errors import ConfigError
from servicekit.urls import parse_mqtt_urls

from .regions import Region, parse_regions


class AgentConfig(ServiceConfig, frozen=True, kw_only=True):
    """Settings of one edge agent; see ``edge_agent/agent.toml.example``.

    Durations are in seconds, sizes in bytes. ``http_port = 0`` picks a free
    port (tests); ``http_enabled = false`` runs the Python API only (simulator).
    """

    device_id: Annotated[
        DeviceId,
        doc(
            "This device's id, which names its MQTT topics and account; set it once per "
            "device, as enrolment wrote it into agent.toml"
        ),
    ]
    mqtt_url: Annotated[
        str,
        doc(
            "Broker the orders go to, mqtt://[user@]host[:port] or mqtts:// for TLS, with the "
            "device's account (its password in agent.toml or --mqtt-password-file); several "
            "brokers comma-separated, tried in order; --region replaces it in geo mode"
        ),
    ] = "mqtt://127.0.0.1:1883"
    mqtt_password: MqttPassword = ""
    mqtt_password_file: Annotated[
        str,
        doc(
            "File holding the device's broker password on one line (keep it 0600), for "
            "--mqtt-url and every --region URL without one; never put a password in a flag"
        ),
    ] = ""
    region: Annotated[
        str | tuple[str, ...],
        doc(
            "Geo mode: a region and its broker as NAME=MQTT_URL, home first, one flag each "
            "(comma-separated in ORDERS_REGION, a list in TOML); the same NAME again, next to "
            "it, adds a broker to that region; replaces --mqtt-url"
        ),
    ] = ()
    failover_after_s: Annotated[
        float,
        doc(
            "Seconds without a connection before the agent moves to its region's next broker, "
            "then to the next region; with orders in flight and no answer that long, to the "
            "next region; lower to fail over sooner"
        ),
    ] = 60.0
    broker_order: Annotated[
        Literal["listed", "hashed"],
        doc(
            "Order the agent tries a region's brokers in: listed (as given), or hashed (an "
            "order of the device's own, by rendezvous hashing of its id, so one fleet-wide "
            "list spreads devices evenly over the brokers, and a lost broker's devices over "
            "the others)"
        ),
    ] = "listed"
    failback_probe_s: Annotated[
        float,
        doc(
            "Geo mode: seconds between CONNECT probes of home's broker while away (doubling "
            "after each failed return); the agent goes home at the first CONNACK"
        ),
    ] = 30.0
    db: Annotated[
        str,
        doc(
            "Path of the SQLite outbox that keeps every accepted order until its receipt; put "
            "it on persistent storage that survives a power cut"
        ),
    ] = "/var/lib/edge-agent/outbox.db"
    http_host: Annotated[
        str,
        doc(
            "Address of the local intake (POST /v1/orders) and /metrics; keep loopback unless "
            "apps on other hosts must submit orders"
        ),
    ] = "127.0.0.1"
    http_port: Annotated[
        int,
        doc(
            "TCP port of the local intake and /metrics; change it when the port is taken, 0 "
            "picks a free one"
        ),
    ] = 8080
    http_enabled: Annotated[
        bool,
        doc(
            "Serve the local HTTP intake; turn off only where orders come through the Python "
            "API (the fleet simulator)"
        ),
    ] = True
    http_allowed_hosts: Annotated[
        str,
        doc(
            "Comma-separated Host names the intake answers besides localhost, 127.0.0.1 and "
            "[::1] (others get 421, against DNS rebinding); add the name apps use"
        ),
    ] = ""
    http_token: Annotated[
        str,
        doc(
            "Bearer token that /v1/* requires when set, given in agent.toml (keep it 0600), "
            "ORDERS_HTTP_TOKEN or --http-token-file (as a flag every local user can read it); "
            "set it when other local users or hosts could reach the intake",
            secret=True,
        ),
    ] = ""
    http_token_file: Annotated[
        str,
        doc(
            "File holding --http-token on one line (keep it 0600), instead of the setting "
            "itself; use it when the token comes from a secrets store"
        ),
    ] = ""
    client_id: Annotated[
        str,
        doc(
            "MQTT client id that keeps the device's persistent session; leave empty for "
            "edge-DEVICE_ID unless the broker's accounts expect another id"
        ),
    ] = ""
    keepalive_s: Annotated[
        int,
        doc(
            "MQTT keepalive in seconds: how soon a dead connection is noticed; lower to notice "
            "sooner, raise on a metered or sleepy link"
        ),
    ] = 30
    session_expiry_s: Annotated[
        int,
        doc(
            "Seconds the broker keeps the device's session (receipts and statuses queued for "
            "it) while it is offline; cover the longest outage you expect"
        ),
    ] = 7 * 24 * 3600
    connect_timeout_s: Annotated[
        float,
        doc(
            "Seconds a connection attempt to the broker may take before it is abandoned and "
            "retried; raise on a slow link"
        ),
    ] = 10.0
    ca_file: Annotated[
        str,
        doc(
            "PEM CA bundle that verifies an mqtts:// broker; set it when the broker's "
            "certificate comes from a private CA, empty uses the system's CAs"
        ),
    ] = ""
    cert_file: Annotated[
        str,
        doc(
            "PEM client certificate presented to the broker, with --key-file; set it when the "
            "broker authenticates devices by certificate"
        ),
    ] = ""
    key_file: Annotated[
        str,
        doc("PEM private key of --cert-file (keep it 0600); set it together with --cert-file"),
    ] = ""
    max_inflight: Annotated[
        int,
        doc(
            "Orders sent and awaiting a receipt at once; raise to drain a backlog faster over "
            "a high-latency link, lower to spare a small broker"
        ),
    ] = 100
    drain_rate_per_min: Annotated[
        float,
        doc(
            "Orders per minute the agent sends at most (a backlog drains at this pace); lower "
            "it to spare the cloud when many devices come back from an outage at once"
        ),
    ] = 6000.0
    receipt_timeout_s: Annotated[
        float,
        doc(
            "Seconds to wait for an order's receipt before sending it again; raise if a slow "
            "cloud makes the agent resend orders that were only late"
        ),
    ] = 30.0
    rate_limited_retry_s: Annotated[
        float,
        doc(
            "Seconds to wait before resending an order the bridge answered rate_limited; raise "
            "if the bridge's limit is tight"
        ),
    ] = 10.0
    pending_retry_min_s: Annotated[
        float,
        doc(
            "Geo mode: first wait in seconds before resending an order answered pending (its "
            "authority region unreachable); waits grow with jitter up to the max"
        ),
    ] = 5.0
    pending_retry_max_s: Annotated[
        float,
        doc(
            "Geo mode: longest wait in seconds between resends of an order answered pending, so "
            "an order lands within about this long of its region or a bridge's fix coming back"
        ),
    ] = 60.0
    resend_max_age_s: Annotated[
        float,
        doc(
            "Seconds after its first send that an unreceipted order is no longer resent but "
            "rejected and alarmed on; must stay below the bridge's dedup TTL (7 days)"
        ),
    ] = 6 * 24 * 3600.0
    reconnect_min_s: Annotated[
        float,
        doc(
            "Window in seconds of the first wait before reconnecting to the broker (a uniform "
            "draw from 0 to it, after a lost connection too), doubling after each failure up "
            "to --reconnect-max-s; a fleet that loses its broker at once reconnects over it, so "
            "give it about the broker's device count x 2 ms (docs/explanation/brokers.md)"
        ),
    ] = 0.5
    reconnect_max_s: Annotated[
        float,
        doc(
            "Longest wait in seconds between reconnects to the broker; lower to come back "
            "sooner after a long outage, raise for very large fleets"
        ),
    ] = 60.0
    puback_retry_min_s: Annotated[
        float,
        doc(
            "First wait in seconds before resending an order the broker refused transiently "
            "(PUBACK 0x80, 0x83, 0x97…), growing with jitter up to the max"
        ),
    ] = 1.0
    puback_retry_max_s: Annotated[
        float,
        doc(
            "Longest wait in seconds between resends after transient PUBACK refusals; lower to "
            "retry sooner, raise to spare a struggling broker"
        ),
    ] = 60.0
    poll_interval_s: Annotated[
        float,
        doc(
            "Longest sleep in seconds before an idle agent checks its outbox for due orders "
            "(new orders wake it at once); raise to save CPU when simulating big fleets"
        ),
    ] = 1.0
    health_interval_s: Annotated[
        float,
        doc(
            "Seconds between health reports on v1/devices/ID/health (also sent on a real "
            "change, with an MQTT Will for offline detection); 0 turns both off"
        ),
    ] = 300.0
    status_query_delay_s: Annotated[
        float,
        doc(
            "Seconds after its receipt that an accepted order still without a final status is "
            "asked about (StatusQuery); raise if orders take long to process"
        ),
    ] = 60.0
    status_query_max_interval_s: Annotated[
        float,
        doc(
            "Longest wait in seconds between repeated status queries of one order (the waits "
            "grow from --status-query-delay-s); lower to recover statuses sooner"
        ),
    ] = 3600.0
    status_query_max_age_s: Annotated[
        float,
        doc(
            "Seconds after its first send that the agent stops asking for an order's status "
            "and logs it as never heard; keep at the bridge's dedup TTL"
        ),
    ] = float(names.DEDUP_TTL_S)
    max_rows: Annotated[
        int,
        doc(
            "Most unreceipted orders the outbox holds; past it the intake answers 507 and "
            "evicts nothing; raise for longer offline periods"
        ),
    ] = 100_000
    max_bytes: Annotated[
        int,
        doc(
            "Most bytes of unreceipted orders the outbox holds; past it the intake answers 507; "
            "raise for longer offline periods if the disk allows"
        ),
    ] = 64 * 1024 * 1024
    retention_s: Annotated[
        float,
        doc(
            "Seconds receipted orders stay in the outbox for GET /v1/orders before they are "
            "pruned; lower to keep the file small"
        ),
    ] = 24 * 3600.0
    prune_interval_s: Annotated[
        float,
        doc(
            "Seconds between prunes of orders past --retention-s (and expiry of orders past "
            "--resend-max-age-s); lower for a small disk"
        ),
    ] = 300.0
    storage_retry_s: Annotated[
        float,
        doc(
            "Seconds between tries to reopen the outbox after a storage error (disk full or "
            "failing); lower to resume sooner, raise to spare a failing disk"
        ),
    ] = 5.0
    batch_max: Annotated[
        int,
        doc(
            "Most orders written to the outbox in one SQLite transaction; lower if a very "
            "slow disk makes single commits too long"
        ),
    ] = 1024
    otlp_endpoint: OtlpEndpoint = ""
    trace_sample_ratio: Annotated[
        float,
        msgspec.Meta(ge=0, le=1),
        doc(
            "Fraction 0..1 of traces recorded; while tracing is off, of the orders without an "
            "app's traceparent the intake gives a sampled one for the cloud (the rest carry "
            "none); lower it to cut tracing cost"
        ),
    ] = 1.0

    def with_secret_files(self) -> AgentConfig:
        """The settings with the password and token files read in (see ServiceConfig).

        Raises:
            ConfigError: a file cannot be read, or a secret is given twice.
        """
        password = one_secret(self.mqtt_password, self.mqtt_password_file, "mqtt_password")
        token = one_secret(self.http_token, self.http_token_file, "http_token")
        region = self.region
        if password:
            entries = region.split(",") if isinstance(region, str) else region
            region = entries_with_password((e.strip() for e in entries if e.strip()), password)
        return msgspec.structs.replace(
            self,
            mqtt_url=urls_with_password(self.mqtt_url, password, "mqtt_url"),
            region=region,
            http_token=token,
            mqtt_password="",
            mqtt_password_file="",
            http_token_file="",
        )

    def validate(self) -> None:
        """Refuse settings that would break a delivery promise; the command runs this at start.

        Raises:
            ConfigError: a bad ``region`` entry, or a resend horizon that reaches the
                bridge's dedup marker TTL (a resend after the marker expired, in any
                region, would be appended twice).
        """
        if not self.regions:
            parse_mqtt_urls(self.mqtt_url)
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
