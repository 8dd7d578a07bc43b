"""The seam between the bridge and its MQTT client.

An :class:`Intake` hands each QoS 1 message of the shared subscription to a
:data:`MessageSink` together with an ``ack`` callable, and sends the PUBACK
only when the bridge calls ``ack``, which it does once Redis holds the order
or its dead letter. A message whose ``ack`` is never called stays unacked, and
the broker redelivers it with the session. No task or thread hop per message:
the sink is a plain call, and the bridge's batcher calls ``ack`` when a batch
is written. The implementation is :class:`MqttIntake`, a
:class:`servicekit.mqtt.MqttClient` (our asyncio protocol on the Rust ``mqtt5``
codec: PUBACKs and receipts of a batch leave in one socket write) that also
publishes receipts; tests plug in their own.
"""

from __future__ import annotations

from collections.abc import Callable
from types import TracebackType
from typing import Protocol, Self

from schemas.names import receipts_topic
from servicekit.mqtt import MqttClient, QueueFull

from .errors import IntakeError

Ack = Callable[[], None]
"""Send the PUBACK of one message (a no-op if its connection is gone)."""


class MessageSink(Protocol):
    """Takes one message; must not block; calls ack later or never.

    ``traceparent`` is the message's MQTT 5 user property of that name (the
    order's trace context, servicekit.tracing), None when it has none.
    """

    def __call__(
        self, topic: str, payload: bytes, ack: Ack, traceparent: str | None = None, /
    ) -> None: ...


class Intake(Protocol):
    """A source of order messages, acked only when the bridge says so; an async context manager.

    It exists (and takes :meth:`publish_receipt` calls) before ``async with`` connects it.
    """

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...

    @property
    def connected(self) -> bool:
        """True while connected and subscribed."""
        ...

    def publish_receipt(self, device_id: str, body: bytes) -> object:
        """Publish a receipt to its device at QoS 1; queued while disconnected or out of window.

        Raises:
            IntakeError: the receipt cannot be sent (agents resend their order).
        """
        ...

    def pause_reading(self) -> None:
        """Stop reading from the broker (TCP backpressure) until :meth:`resume_reading`."""
        ...

    def resume_reading(self) -> None:
        """Read from the broker again."""
        ...


IntakeFactory = Callable[[MessageSink], Intake]


class MqttIntake(MqttClient):
    """:class:`Intake` on the MQTT client: receipts leave as QoS 1 publishes."""

    def publish_receipt(self, device_id: str, body: bytes) -> None:
        """Publish ``body`` on ``v1/devices/{device_id}/receipts`` at QoS 1 and forget.

        Raises:
            IntakeError: the client's queue is full (the agent resends the order).
        """
        try:
            self.publish(receipts_topic(device_id), body)
        except QueueFull as exc:
            raise IntakeError(str(exc)) from exc
