"""The device agent: durable SQLite outbox, MQTT 5 publisher settled by receipts, HTTP intake."""

from .agent import EdgeAgent, Health, new_order_id
from .config import AgentConfig
from .errors import AgentClosed, AgentError, BrokerError, InvalidOrder, OutboxFull, StorageError
from .outbox import OrderRecord, Outbox, Submitted

__all__ = [
    "AgentClosed",
    "AgentConfig",
    "AgentError",
    "BrokerError",
    "EdgeAgent",
    "Health",
    "InvalidOrder",
    "OrderRecord",
    "Outbox",
    "OutboxFull",
    "StorageError",
    "Submitted",
    "new_order_id",
]
