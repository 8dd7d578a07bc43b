"""Several brokers of one region: where a worker's statuses go, and who answers queries.

A device is connected to one broker of its region at a time (the agent moves
to the next one when its broker fails), and a worker does not know which.
:class:`StatusFanout` publishes each status to every broker: the one where the
device is connected delivers it, the others drop it (no subscriber) or keep it
in the device's old session until that expires. Measured against looking the
device's broker up per status: docs/explanation/brokers.md.

Status queries are answered on the broker the query came from (one
responder per broker, in pipeline/service.py): the device is there.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence
from typing import Final

import structlog

from servicekit.mqtt import MqttClient, QueueFull

log = structlog.get_logger(__name__)
# PUBACK codes that mean the broker took the message (0x10: nobody subscribed there).
DELIVERED: Final = frozenset({0x00, 0x10})


class StatusFanout:
    """The :class:`~pipeline.status.StatusClient` of a worker with several brokers' clients.

    A broker whose client is full (down for long) is skipped for that status:
    its devices have moved to a live broker, which gets it. ``in_flight`` is
    the least of the clients', so one dead broker does not make the worker
    shed statuses the live ones would deliver.
    """

    def __init__(self, clients: Sequence[MqttClient]) -> None:
        if not clients:
            raise ValueError("StatusFanout needs a client")
        self.clients = tuple(clients)

    @property
    def in_flight(self) -> int:
        return min(client.in_flight for client in self.clients)

    @property
    def connected(self) -> bool:
        return any(client.connected for client in self.clients)

    def publish(self, topic: str, payload: bytes) -> None:
        """Publish to every broker whose client has room.

        Raises:
            QueueFull: no client took it.
        """
        refused: QueueFull | None = None
        taken = 0
        for client in self.clients:
            try:
                client.publish(topic, payload)
                taken += 1
            except QueueFull as exc:
                refused = exc
        if not taken and refused is not None:
            raise refused

    def publish_many(self, messages: Iterable[tuple[str, bytes]]) -> int:
        """Publish each to every broker whose client has room; return how many leading
        messages some client took (each client takes a leading run of them)."""
        batch = messages if isinstance(messages, Sequence) else list(messages)
        return max(client.publish_many(batch) for client in self.clients)

    def publish_acked(self, topic: str, payload: bytes) -> asyncio.Future[int]:
        """Publish to every broker with room; the future ends with the first delivered PUBACK.

        It ends with the last broker's code when none delivered it.

        Raises:
            QueueFull: no client took it.
        """
        acks: list[asyncio.Future[int]] = []
        refused: QueueFull | None = None
        for client in self.clients:
            try:
                acks.append(client.publish_acked(topic, payload))
            except QueueFull as exc:
                refused = exc
        if not acks and refused is not None:
            raise refused
        first: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        left = [len(acks)]

        def settle(ack: asyncio.Future[int]) -> None:
            left[0] -= 1
            if first.done():
                return
            failed = ack.cancelled() or ack.exception() is not None
            if not failed and ack.result() in DELIVERED:
                first.set_result(ack.result())
            elif not left[0]:
                if failed:
                    first.set_exception(ConnectionError("no broker acked the status"))
                else:
                    first.set_result(ack.result())

        for ack in acks:
            ack.add_done_callback(settle)
        return first
