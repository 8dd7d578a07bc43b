"""Geo test rig for the agent side: one real Mosquitto per region, each with a bridge double.

The doubles stand for OUR bridge (the geo-bridge tests cover the real one):
each records, per order, the ``attempts`` and raw bytes of every PUBLISH its
region's broker delivered, and answers receipts per its policy.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from typing import Any, Self

import msgspec
import paho.mqtt.client as paho

from schemas import decode_order

from .bridge_double import BridgeDouble, Policy, accept_all


class RegionBridge(BridgeDouble):
    """A :class:`BridgeDouble` of one region that also records what each order carried."""

    def __init__(self, name: str, mqtt_url: str, policy: Policy = accept_all, **kwargs: Any):
        super().__init__(mqtt_url, policy, **kwargs)
        self.name = name
        self.attempts: defaultdict[str, list[tuple[str, ...]]] = defaultdict(list)
        self.payloads: defaultdict[str, list[bytes]] = defaultdict(list)
        self.keys: defaultdict[str, list[frozenset[str]]] = defaultdict(list)
        self.first_seen: dict[str, float] = {}
        self._rec_lock = threading.Lock()

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        if not msg.topic.endswith("/status-query"):
            payload = bytes(msg.payload)
            order = decode_order(payload)
            raw = msgspec.msgpack.decode(payload)
            with self._rec_lock:
                self.attempts[order.order_id].append(order.attempts)
                self.payloads[order.order_id].append(payload)
                self.keys[order.order_id].append(frozenset(raw))
                self.first_seen.setdefault(order.order_id, time.monotonic())
        super()._on_message(client, userdata, msg)

    def __enter__(self) -> Self:
        super().__enter__()
        return self

    def carried(self, order_id: str) -> list[tuple[str, ...]]:
        with self._rec_lock:
            return list(self.attempts[order_id])


def never_answer(_order_id: str, _count: int) -> None:
    """A bridge that receives but never sends a receipt (dead after the broker's PUBACK)."""
