"""Several brokers of one region: one intake on each, seen by the bridge as one.

Each broker gets its own :class:`~bridge.intake.MqttIntake` holding the
shared subscription there, so every broker's orders reach a bridge. An
order's receipt goes to the broker its order came from, where its device is
connected: :class:`BrokerSet` remembers each device's last broker
(a bounded map, cleared when full). A receipt for a device it does not
remember (after a clear) goes to every connected broker; a device that left
for another broker meanwhile still gets it there, and a broker with no
subscriber drops it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Final, Self

from schemas import SchemaError
from schemas.ids import is_device_id
from schemas.names import device_id_from_orders_topic

from .errors import IntakeError
from .intake import Ack, MessageSink, MqttIntake

MAX_REMEMBERED: Final = 200_000
"""Devices whose broker is remembered at once (some 100 bytes each)."""


class BrokerSet:
    """An :class:`~bridge.intake.Intake` over several brokers' intakes, ``make(index, sink)``."""

    def __init__(
        self,
        count: int,
        sink: MessageSink,
        make: Callable[[int, MessageSink], MqttIntake],
        *,
        max_remembered: int = MAX_REMEMBERED,
    ) -> None:
        self._sink = sink
        self._via: dict[str, int] = {}
        self._max_remembered = max_remembered
        self._stack = contextlib.AsyncExitStack()
        self.intakes: Sequence[MqttIntake] = [make(i, self._sink_of(i)) for i in range(count)]

    def _sink_of(self, index: int) -> MessageSink:
        def take(topic: str, payload: bytes, ack: Ack, traceparent: str | None = None, /) -> None:
            try:
                device_id = device_id_from_orders_topic(topic)
            except SchemaError:
                device_id = ""
            if is_device_id(device_id):
                if len(self._via) >= self._max_remembered and device_id not in self._via:
                    self._via.clear()
                self._via[device_id] = index
            self._sink(topic, payload, ack, traceparent)

        return take

    async def __aenter__(self) -> Self:
        async with contextlib.AsyncExitStack() as stack:
            for intake in self.intakes:
                await stack.enter_async_context(intake)
            self._stack = stack.pop_all()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._stack.__aexit__(exc_type, exc, tb)

    @property
    def connected(self) -> bool:
        """True while at least one broker is connected: the bridge still takes orders."""
        return any(intake.connected for intake in self.intakes)

    @property
    def connected_brokers(self) -> int:
        return sum(1 for intake in self.intakes if intake.connected)

    def publish_receipt(self, device_id: str, body: bytes) -> None:
        """To the device's last broker; to every connected one if it is not remembered.

        Raises:
            IntakeError: no broker took the receipt (the agent resends its order).
        """
        index = self._via.get(device_id)
        targets = [self.intakes[index]] if index is not None else self.intakes
        sent = 0
        for intake in targets:
            if index is None and not intake.connected:
                continue
            try:
                intake.publish_receipt(device_id, body)
                sent += 1
            except IntakeError:
                continue
        if not sent:
            raise IntakeError("no broker took the receipt")

    def pause_reading(self) -> None:
        for intake in self.intakes:
            intake.pause_reading()

    def resume_reading(self) -> None:
        for intake in self.intakes:
            intake.resume_reading()
