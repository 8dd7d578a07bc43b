"""The seam between the bridge and its MQTT client library.

An :class:`Intake` delivers each QoS 1 message of the shared subscription to a
:data:`MessageHandler` and sends the PUBACK only when that handler returned;
a handler that raises or is cancelled leaves the message unacked, and the
broker redelivers it with the session. Two implementations:

- :mod:`bridge.intake_mqtt5` (default): our own asyncio protocol on the
  Rust ``mqtt5`` codec; coalesces PUBACKs and receipts into one write per
  loop turn. About 10× gmqtt's receive path (``bench/mqtt_clients.py``).
- :mod:`bridge.intake_gmqtt`: gmqtt with ``optimistic_acknowledgement=False``.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol

MessageHandler = Callable[[str, bytes], Coroutine[Any, Any, None]]
"""Called per message; returning means "stored, ack it", raising means "don't"."""


class Intake(Protocol):
    """A source of order messages that acks each one only after its handler returned."""

    @property
    def connected(self) -> bool:
        """True while connected and subscribed."""
        ...

    async def publish(self, topic: str, payload: bytes) -> None:
        """Publish at QoS 1 (receipts), waiting while the outgoing window is full.

        Raises:
            IntakeError: not connected, or no room in the window in time.
        """
        ...

    def cancel_pending(self) -> None:
        """Cancel handlers still running; their messages stay unacked."""
        ...


IntakeFactory = Callable[[MessageHandler], AbstractAsyncContextManager[Intake]]
