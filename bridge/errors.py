"""Errors raised by the bridge.

Hierarchy::

    BridgeError            root of the bridge's errors
    ├── StoreError         Redis refused a write or could not be reached (retried)
    └── IntakeError        the MQTT broker refused us or could not be reached

Bad input from devices is not an error of the bridge: it is a
:class:`schemas.DecodeError` with a reason code, turned into a DLQ entry and a
``rejected`` receipt.
"""

from __future__ import annotations


class BridgeError(Exception):
    """Root of the bridge's errors."""


class StoreError(BridgeError):
    """A Redis round trip failed; the batch is retried, nothing is acknowledged."""


class IntakeError(BridgeError):
    """The MQTT side failed: refused connection, lost session, wrong protocol."""
