"""The seam between the bridge and its MQTT client library.

An :class:`Intake` hands each QoS 1 message of the shared subscription to a
:data:`MessageSink` together with an ``ack`` callable, and sends the PUBACK
only when the bridge calls ``ack``, which it does once Redis holds the order
or its dead letter. A message whose ``ack`` is never called stays unacked, and
the broker redelivers it with the session. No task or thread hop per message:
the sink is a plain call, and the bridge's batcher calls ``ack`` when a batch
is written. Two implementations:

- :mod:`bridge.intake_mqtt5` (default): our own asyncio protocol on the Rust
  ``mqtt5`` codec; PUBACKs and receipts of a batch leave in one socket write.
  Mosquitto 2.0 does not hold a reconnecting session's backlog to our Receive
  Maximum (we saw 29,500 unacked messages in flight), so the bridge also
  bounds its in-flight work itself by pausing the socket's reads.
- :mod:`bridge.intake_gmqtt`: gmqtt with ``optimistic_acknowledgement=False``
  (a task per message; slower, see ``bench/mqtt_clients.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Protocol

Ack = Callable[[], None]
"""Send the PUBACK of one message (a no-op if its connection is gone)."""

MessageSink = Callable[[str, bytes, Ack], None]
"""Takes one message (topic, payload, ack); must not block; calls ack later or never."""


class Intake(Protocol):
    """A source of order messages, acked only when the bridge says so."""

    @property
    def connected(self) -> bool:
        """True while connected and subscribed."""
        ...

    def publish(self, topic: str, payload: bytes) -> None:
        """Publish at QoS 1 (receipts); queued while the outgoing window is full.

        Raises:
            IntakeError: not connected (the receipt is not sent; agents resend).
        """
        ...

    def pause_reading(self) -> None:
        """Stop reading from the broker (TCP backpressure) until :meth:`resume_reading`."""
        ...

    def resume_reading(self) -> None:
        """Read from the broker again."""
        ...


IntakeFactory = Callable[[MessageSink], AbstractAsyncContextManager[Intake]]
