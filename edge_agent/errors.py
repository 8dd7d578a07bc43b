"""Errors raised by the edge agent.

Hierarchy::

    AgentError             root; carries a machine-readable ``reason`` code
    ├── InvalidOrder       the submitted order breaks a contract rule (HTTP 400/422)
    ├── OutboxFull         the outbox is at its row or byte cap (HTTP 507)
    ├── StorageError       SQLite could not write or open: disk full, read-only, I/O
    ├── AgentClosed        the agent is shutting down and takes no more orders
    ├── BrokerError        the MQTT broker refused or dropped the connection
    └── BackgroundLoopDied a background loop ended; the agent stops (the process exits non-zero)

Every error names its ``reason``; HTTP intake turns it into an RFC 9457
problem body, and ``/healthz`` shows the last storage error.
"""

from __future__ import annotations


class AgentError(Exception):
    """Root of the edge agent's errors.

    Attributes:
        reason: machine-readable code (``invalid_schema``, ``outbox_full``, ``disk_full``…).
        detail: human-readable explanation.
    """

    reason: str = "agent_error"

    def __init__(self, detail: str, *, reason: str | None = None) -> None:
        super().__init__(f"{reason or self.reason}: {detail}")
        self.detail = detail
        if reason is not None:
            self.reason = reason


class InvalidOrder(AgentError):
    """An order that can never be sent: refused at intake, never stored.

    Attributes:
        field: JSON path of the offending field (``$.items[0].qty``) or None.
    """

    reason = "invalid_schema"

    def __init__(self, detail: str, *, reason: str | None = None, field: str | None = None) -> None:
        super().__init__(detail, reason=reason)
        self.field = field


class OutboxFull(AgentError):
    """The outbox holds its cap of unreceipted orders; nothing was evicted."""

    reason = "outbox_full"


class StorageError(AgentError):
    """SQLite failed: ``disk_full``, ``read_only``, ``io_error`` or ``unavailable``."""

    reason = "storage_error"


class AgentClosed(AgentError):
    """The agent is closing or closed."""

    reason = "agent_closed"


class BrokerError(AgentError):
    """The MQTT connection could not be made or was refused."""

    reason = "broker_error"


class BackgroundLoopDied(AgentError):
    """A background loop that should run for ever ended (a bug): the agent must restart.

    Attributes:
        loop: the loop's name (``publisher``, ``status_recovery``, ``maintenance``,
            ``outbox_writer``).
    """

    reason = "background_loop_died"

    def __init__(self, loop: str, detail: str) -> None:
        super().__init__(f"background loop {loop!r} ended: {detail}")
        self.loop = loop
