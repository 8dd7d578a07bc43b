"""Status messages back to devices, over the cloud's own MQTT client.

The publisher and the status-query responder (:mod:`pipeline.status_query`)
share one :class:`servicekit.mqtt.MqttClient` per worker process: one
connection, the same client id, its session's unacked statuses resent after a
reconnect.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import Final, Protocol

import structlog

from schemas import Status, encode
from schemas.names import status_topic
from servicekit.backoff import Backoff
from servicekit.mqtt import MqttClient, MqttMetrics, QueueFull
from servicekit.urls import MqttUrl

from .config import PipelineConfig

log = structlog.get_logger(__name__)
CONNECT_WAIT_S: Final = 10.0
# No session outlives its connection: a worker's client id changes with its pid,
# and a dead worker's session would keep taking its share of the status queries
# (shared subscription) until it expired, answering none. Statuses unacked at a
# disconnect stay with the client and are resent; a lost query is asked again.
SESSION_EXPIRY_S: Final = 0
# PUBACK codes that mean the broker took the message (0x10: nobody subscribed).
_DELIVERED: Final = frozenset({0x00, 0x10})


class StatusPublisher(Protocol):
    """Publishes Status messages at QoS 1 to ``v1/devices/{id}/status``."""

    async def publish(self, messages: Sequence[tuple[str, Status]]) -> int:
        """Publish ``(device_id, status)`` pairs; return how many the broker acked in time."""


class MqttStatusPublisher:
    """Publishes a batch of statuses and waits (up to a timeout) for all their PUBACKs.

    Messages not acked in time stay with the client, which resends them after
    a reconnect; the caller logs the shortfall and carries on, so a broker
    outage does not stop the pipeline (a redelivered order publishes its
    status again).
    """

    def __init__(self, client: MqttClient, *, ack_timeout_s: float = 5.0) -> None:
        self._client = client
        self._ack_timeout_s = ack_timeout_s

    async def publish(self, messages: Sequence[tuple[str, Status]]) -> int:
        """Publish all, then wait until the broker acked every one or the timeout passed."""
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


async def _all_done(acks: Sequence[asyncio.Future[int]]) -> None:
    """Wait for every future, in order. Most are done by the time the first pending one
    is: those cost no callback and no loop turn (``asyncio.wait`` adds a callback to each
    of thousands). Shielded: a timeout must not cancel the client's own futures."""
    for ack in acks:
        if not ack.done():
            with contextlib.suppress(Exception):
                await asyncio.shield(ack)


def status_client(
    config: PipelineConfig, client_id: str, *, metrics: MqttMetrics | None = None
) -> MqttClient:
    """A worker's MQTT client (statuses out; the caller subscribes to status queries)."""
    return MqttClient(
        MqttUrl.parse(config.mqtt_url),
        client_id=client_id,
        clean_start=True,
        session_expiry_s=SESSION_EXPIRY_S,
        receive_maximum=config.status_query_window,
        backoff=Backoff(0.1, 5.0),
        connect_wait_s=CONNECT_WAIT_S,
        ca_file=config.mqtt_ca_file,
        metrics=metrics,
        name="pipeline-status",
    )
