"""Prometheus metrics of one agent, in a registry of its own.

A private :class:`CollectorRegistry` per agent (not the process-global one)
lets the fleet simulator run thousands of agents in one process.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest


class AgentMetrics:
    """The counters and gauges one agent exports on ``/metrics``."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.submitted = Counter(
            "edge_orders_submitted", "Orders committed to the outbox", registry=r
        )
        self.duplicates = Counter(
            "edge_orders_duplicate_submits", "Submits of an order_id already stored", registry=r
        )
        self.refused = Counter(
            "edge_orders_refused", "Submits refused, by reason", ["reason"], registry=r
        )
        self.published = Counter("edge_orders_published", "PUBLISH packets sent", registry=r)
        self.receipts = Counter(
            "edge_receipts", "Receipts received, by result", ["result"], registry=r
        )
        self.receipt_timeouts = Counter(
            "edge_receipt_timeouts", "Orders re-queued after no receipt came in time", registry=r
        )
        self.statuses = Counter(
            "edge_statuses", "Pipeline status messages, by status", ["status"], registry=r
        )
        self.broker_rejections = Counter(
            "edge_broker_rejections", "PUBACKs with a reason code >= 128", ["code"], registry=r
        )
        self.invalid_messages = Counter(
            "edge_invalid_messages", "Undecodable receipts or statuses", registry=r
        )
        self.expired = Counter(
            "edge_orders_unreceipted_expired",
            "Orders given up after resend_max_age_s without a receipt",
            registry=r,
        )
        self.connects = Counter("edge_mqtt_connects", "Successful MQTT connects", registry=r)
        self.connect_failures = Counter(
            "edge_mqtt_connect_failures", "Failed MQTT connect attempts", registry=r
        )
        self.status_queries = Counter(
            "edge_status_queries", "StatusQuery messages published", registry=r
        )
        self.status_queries_given_up = Counter(
            "edge_status_queries_given_up",
            "Accepted orders whose terminal status never came within the dedup horizon",
            registry=r,
        )
        self.retried_held = Counter(
            "edge_orders_held_retried", "Held orders re-queued by an operator", registry=r
        )
        self.commands = Counter(
            "edge_commands",
            "Command messages from the cloud, by outcome: retry_held (carried out), "
            "duplicate (an id already done), unknown (a command this agent lacks), invalid",
            ["outcome"],
            registry=r,
        )
        self.loop_errors = Counter(
            "edge_background_loop_errors",
            "Unexpected errors a background loop survived, by loop",
            ["loop"],
            registry=r,
        )
        self.region_switches = Counter(
            "edge_region_switches",
            "Broker changes, by kind (broker: the same region's next broker; geo mode's "
            "failover, failback)",
            ["kind"],
            registry=r,
        )
        self.connected = Gauge("edge_mqtt_connected", "1 while connected to the broker", registry=r)
        self.pending = Gauge("edge_outbox_pending_orders", "Unreceipted orders", registry=r)
        self.pending_bytes = Gauge(
            "edge_outbox_pending_bytes", "Bytes of unreceipted orders", registry=r
        )
        self.storage_error = Gauge(
            "edge_outbox_storage_error", "1 while the outbox cannot write", registry=r
        )
        self.inflight = Gauge(
            "edge_orders_inflight", "Orders sent and awaiting receipt", registry=r
        )
        self.oldest_pending_age = Gauge(
            "edge_outbox_oldest_pending_age_seconds",
            "Age of the oldest unreceipted order (0 when none); refreshed on each scrape",
            registry=r,
        )
        self.awaiting_authority = Gauge(
            "edge_orders_awaiting_authority",
            "Geo: unreceipted orders whose last receipt was `pending` (authority unreachable "
            "or unknown to the bridge); refreshed on each scrape",
            registry=r,
        )
        self.awaiting_unknown_region = Gauge(
            "edge_orders_awaiting_unknown_region",
            "Geo: of those, orders a bridge answered `pending` (unknown_region): their home "
            "region is missing from the bridge's --region-redis; refreshed on each scrape",
            registry=r,
        )
        self.held = Gauge(
            "edge_orders_held",
            "Orders the broker refused with a definitive PUBACK code; `edge-agent retry` re-queues",
            registry=r,
        )

    def bind(
        self,
        *,
        pending: Callable[[], float],
        pending_bytes: Callable[[], float],
        storage_error: Callable[[], float],
        inflight: Callable[[], float],
        connected: Callable[[], float],
        held: Callable[[], float],
    ) -> None:
        """Compute the gauges at scrape time from the live objects."""
        self.pending.set_function(pending)
        self.pending_bytes.set_function(pending_bytes)
        self.storage_error.set_function(storage_error)
        self.inflight.set_function(inflight)
        self.connected.set_function(connected)
        self.held.set_function(held)

    def render(self) -> bytes:
        """The text exposition format."""
        return generate_latest(self.registry)
