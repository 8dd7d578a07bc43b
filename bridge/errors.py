"""Errors raised by the bridge.

Hierarchy::

    BridgeError                root of the bridge's errors
    ├── StoreError             Redis refused a write or could not be reached (retried)
    │   ├── RedisAuthError     wrong password or user: loud, readiness red, retried
    │   ├── RedisFullError     Redis answered OOM (at maxmemory): nothing acked, retried
    │   └── ReplicasShortfall  written, but WAIT saw fewer replicas than --redis-min-replicas
    └── IntakeError            the MQTT broker refused us or could not be reached

A background loop that cannot go on raises :class:`servicekit.errors.LoopFailed`
(see :mod:`servicekit.loops`); the process then exits non-zero.

Bad input from devices is not an error of the bridge: it is a
:class:`schemas.DecodeError` with a reason code, turned into a DLQ entry and a
``rejected`` receipt.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .store import AppendResult


class BridgeError(Exception):
    """Root of the bridge's errors."""


class StoreError(BridgeError):
    """A Redis round trip failed; the batch is retried, nothing is acknowledged."""


class RedisAuthError(StoreError):
    """Redis refused our credentials (WRONGPASS, NOAUTH): an operator must fix them."""


class RedisFullError(StoreError):
    """Redis is at ``maxmemory`` with ``noeviction`` and refuses writes."""


class ReplicasShortfall(StoreError):
    """The batch is written on the primary, but fewer replicas than required confirmed it.

    ``results`` are the batch's outcomes, kept so the retry (which writes the batch
    again, see ``bridge.batcher``) can still tell each device ``accepted``.
    """

    def __init__(self, message: str, results: list[AppendResult]) -> None:
        super().__init__(message)
        self.results = results


class IntakeError(BridgeError):
    """The MQTT side failed: refused connection, lost session, wrong protocol."""
