"""The cloud bridge: MQTT orders in, exactly-once entries in sharded Redis Streams out.

Run it with ``order-bridge`` (:mod:`bridge.cli`); docs/explanation/bridge.md
explains the design.
"""

from .batcher import Batcher, Outcome
from .config import BridgeConfig
from .errors import BridgeError, IntakeError, StoreError
from .intake import Intake, MessageSink
from .service import Bridge, build_sink
from .store import AppendResult, OrderSink, RedisSink

__all__ = [
    "AppendResult",
    "Batcher",
    "Bridge",
    "BridgeConfig",
    "BridgeError",
    "Intake",
    "IntakeError",
    "MessageSink",
    "OrderSink",
    "Outcome",
    "RedisSink",
    "StoreError",
    "build_sink",
]
