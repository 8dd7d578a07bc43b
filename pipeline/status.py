"""Status messages back to devices, over the cloud's own MQTT client.

The worker and the status-query responder (:mod:`pipeline.status_query`)
share one :class:`servicekit.mqtt.MqttClient` per worker process: one
connection, the same client id, its unacked statuses resent after a reconnect.

Order processing never waits on the broker: the worker hands a batch's
statuses to the client (:meth:`MqttStatusPublisher.send`) and acks the batch
at once. Every status is in the order's record before it is sent, so one
that never reaches its device (the client's backlog was full, the worker
died, the broker lost it) is answered again when the device asks for it
with a status query (:mod:`edge_agent.status_recovery`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable, Sequence
from typing import Final, Protocol

import structlog
from prometheus_client import CollectorRegistry, Counter

from schemas import Status, encode
from schemas.messages import MAX_QUERIED_ORDERS
from schemas.names import status_topic
from servicekit.backoff import Backoff
from servicekit.mqtt import MqttClient, MqttMetrics, QueueFull
from servicekit.urls import MqttUrl, parse_mqtt_urls

from .config import PipelineConfig

log = structlog.get_logger(__name__)
# How long a starting worker waits for the broker before it processes anyway: its
# statuses queue meanwhile, so a broker outage delays no order by more than this.
CONNECT_WAIT_S: Final = 1.0
# No session outlives its connection: a worker's client id changes with its pid,
# and a dead worker's session would keep taking its share of the status queries
# (shared subscription) until it expired, answering none. Statuses unacked at a
# disconnect stay with the client and are resent; a lost query is asked again.
SESSION_EXPIRY_S: Final = 0
# PUBACK codes that mean the broker took the message (0x10: nobody subscribed).
_DELIVERED: Final = frozenset({0x00, 0x10})


class StatusSender(Protocol):
    """Hands Status messages for ``v1/devices/{id}/status`` to the broker without waiting."""

    def send(self, messages: Sequence[tuple[str, Status]]) -> int:
        """Queue ``(device_id, status)`` pairs for QoS 1; return how many were queued."""


class StatusPublisher(Protocol):
    """Publishes Status messages at QoS 1 and waits for the broker's PUBACKs."""

    async def publish(self, messages: Sequence[tuple[str, Status]]) -> int:
        """Publish ``(device_id, status)`` pairs; return how many the broker acked in time."""


class StatusClient(Protocol):
    """What :class:`MqttStatusPublisher` needs of its client: an MqttClient, or a
    :class:`~pipeline.brokers.StatusFanout` over several brokers' clients."""

    @property
    def in_flight(self) -> int: ...
    @property
    def connected(self) -> bool: ...
    def publish(self, topic: str, payload: bytes) -> None: ...
    def publish_many(self, messages: Iterable[tuple[str, bytes]]) -> int: ...
    def publish_acked(self, topic: str, payload: bytes) -> asyncio.Future[int]: ...


class StatusMetrics:
    """Counters of the statuses a worker could not hand to the broker."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        kwargs = {"registry": registry} if registry is not None else {}
        self.unpublished = Counter(
            "pipeline_statuses_unpublished",
            "Statuses a worker did not queue for the broker because its backlog of unacked "
            "statuses was full (broker down or slow); devices get them by status query",
            **kwargs,  # type: ignore[arg-type]
        )


class MqttStatusPublisher:
    """Statuses out through the client, within a bounded backlog of unacked ones.

    The client keeps what it could not send yet (broker down or slow) and
    resends it after a reconnect. The worker's statuses (:meth:`send`) are
    queued only while the client holds fewer than ``backlog_max`` unacked:
    past that, new ones are only counted (``pipeline_statuses_unpublished_total``)
    and logged, and their orders' records hold them for the status query. A
    broker outage costs a worker at most that much memory and no time.
    Status-query answers (:meth:`publish`) are not shed: they are bounded by
    the queries held at once (``status_query_window``), each waiting for its
    answers' PUBACKs.
    """

    def __init__(
        self,
        client: StatusClient,
        *,
        ack_timeout_s: float = 5.0,
        backlog_max: int = 10_000,
        metrics: StatusMetrics | None = None,
    ) -> None:
        self._client = client
        self._ack_timeout_s = ack_timeout_s
        self._backlog_max = backlog_max
        self._metrics = metrics or StatusMetrics(CollectorRegistry())
        self.unpublished = 0  # statuses not queued since start (tests and logs)
        self._shedding = False

    @property
    def backlog(self) -> int:
        """Statuses handed to the client and not acked by the broker yet."""
        return self._client.in_flight

    def send(self, messages: Sequence[tuple[str, Status]]) -> int:
        """Queue what fits in the backlog and return at once (the worker's path)."""
        queued = self._room(messages)
        # One call for the batch: the client queues it all and writes it in one pump.
        taken = self._client.publish_many(
            [(status_topic(device_id), encode(status)) for device_id, status in queued]
        )
        if taken < len(queued):  # the client's own limit, reached before ours: shed the same way
            self._shed(len(queued) - taken)
        return taken

    async def publish(self, messages: Sequence[tuple[str, Status]]) -> int:
        """Publish all, then wait until the broker acked every one or the timeout passed.

        The status-query responder's path: it acks a query only after its answers
        went out (or the timeout passed), and it holds at most its window of queries.
        """
        if not messages:
            return 0
        acks = []
        for device_id, status in messages:
            try:
                acks.append(self._client.publish_acked(status_topic(device_id), encode(status)))
            except QueueFull:
                # Logged and counted by the client; the device recovers the
                # status with its status query.
                break
        if len(acks) < len(messages):
            log.warning("status_publish_refused", refused=len(messages) - len(acks),
                        total=len(messages))  # fmt: skip
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._ack_timeout_s):
                await _all_done(acks)
        pending = sum(1 for ack in acks if not ack.done())
        if pending:
            log.warning("status_puback_timeout", unacked=pending, total=len(messages))
        return sum(
            1
            for ack in acks
            if ack.done() and not ack.cancelled() and ack.exception() is None
            and ack.result() in _DELIVERED
        )  # fmt: skip

    def _room(self, messages: Sequence[tuple[str, Status]]) -> Sequence[tuple[str, Status]]:
        """The leading messages the backlog has room for; the rest are counted and logged."""
        room = max(0, self._backlog_max - self._client.in_flight)
        if room >= len(messages):
            if self._shedding and messages:
                self._shedding = False
                log.info("status_backlog_ok", unpublished=self.unpublished)
            return messages
        self._shed(len(messages) - room)
        return messages[:room]

    def _shed(self, count: int) -> None:
        """Count and log statuses not queued; their records answer the status query."""
        self.unpublished += count
        self._metrics.unpublished.inc(count)
        if not self._shedding:
            self._shedding = True
            log.warning("status_backlog_full", backlog_max=self._backlog_max,
                        connected=self._client.connected,
                        fix="devices get these statuses by status query")  # fmt: skip


async def _all_done(acks: Sequence[asyncio.Future[int]]) -> None:
    """Wait for every future, in order. Most are done by the time the first pending one
    is: those cost no callback and no loop turn (``asyncio.wait`` adds a callback to each
    of thousands). Shielded: a timeout must not cancel the client's own futures."""
    for ack in acks:
        if not ack.done():
            with contextlib.suppress(Exception):
                await asyncio.shield(ack)


def status_client(
    config: PipelineConfig,
    client_id: str,
    *,
    metrics: MqttMetrics | None = None,
    url: MqttUrl | None = None,
) -> MqttClient:
    """A worker's MQTT client (statuses out; the caller subscribes to status queries).

    ``url``: one of several brokers (default: the first of ``mqtt_url``).
    """
    return MqttClient(
        url or parse_mqtt_urls(config.mqtt_url)[0],
        client_id=client_id,
        clean_start=True,
        session_expiry_s=SESSION_EXPIRY_S,
        receive_maximum=config.status_query_window,
        backoff=Backoff(0.1, 5.0),
        connect_wait_s=CONNECT_WAIT_S,
        # Room for the worker's backlog and a full window of status-query answers,
        # so the client never has to drop a queued status itself.
        max_queued=config.status_backlog_max + config.status_query_window * MAX_QUERIED_ORDERS,
        ca_file=config.mqtt_ca_file,
        metrics=metrics,
        name="pipeline-status",
    )
