"""A test double of the cloud bridge: answers every order with a Receipt over real MQTT.

The broker is real; only the bridge (our own interface) is doubled. It
subscribes to ``v1/devices/+/orders`` and answers on the device's receipts
topic, so the agent's end-to-end settlement is exercised for real. It also
stands in for the pipeline's status-query responder: it records every
``StatusQuery`` and, while ``answer_queries`` is set, answers each order it
has seen with a terminal Status (``query_status``).
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from schemas import Receipt, Status, decode_order, decode_status_query, encode, names
from servicekit.clock import now_ms
from servicekit.urls import MqttUrl

# Decide the answer to one order: (result, reason), or None for no receipt at all.
Policy = Callable[[str, int], tuple[str, str | None] | None]


def accept_all(_order_id: str, _count: int) -> tuple[str, str | None]:
    """Accept first sight, call repeats duplicates, like the real bridge."""
    return ("accepted", None) if _count == 1 else ("duplicate", None)


class BridgeDouble:
    """Records every order it sees and answers with receipts, per ``policy``."""

    def __init__(
        self,
        mqtt_url: str,
        policy: Policy = accept_all,
        *,
        send_status: bool = False,
        answer_queries: bool = False,
        query_status: str = "fulfilled",
    ):
        self.url = MqttUrl.parse(mqtt_url)
        self.policy = policy
        self.send_status = send_status
        self.answer_queries = answer_queries
        self.query_status = query_status
        self.queries: list[tuple[str, ...]] = []
        self.seen: Counter[str] = Counter()
        self.seqs: dict[str, int] = {}
        self.subscribed = threading.Event()
        self._lock = threading.Lock()
        self._client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"bridge-double-{time.monotonic_ns()}",
            protocol=MQTTProtocolVersion.MQTTv5,
        )
        self._client.reconnect_delay_set(0.05, 0.2)  # type: ignore[arg-type]  # paho: int, takes float
        self._client.on_connect = self._on_connect
        self._client.on_message = self._on_message
        self._client.on_disconnect = self._on_disconnect

    def __enter__(self) -> BridgeDouble:
        self._client.connect_async(self.url.host, self.url.port, keepalive=5)
        self._client.loop_start()
        assert self.subscribed.wait(10), "bridge double never subscribed"
        return self

    def __exit__(self, *exc: object) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def ids(self) -> set[str]:
        with self._lock:
            return set(self.seen)

    def wait_for(self, order_ids: set[str], timeout_s: float = 30.0) -> set[str]:
        """Wait until every id was seen; return the missing ones."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            missing = order_ids - self.ids()
            if not missing:
                return set()
            time.sleep(0.05)
        return order_ids - self.ids()

    def queried_ids(self) -> set[str]:
        with self._lock:
            return {order_id for query in self.queries for order_id in query}

    def publish_status(self, device_id: str, order_id: str, status: str) -> None:
        """Publish a Status as the pipeline would (QoS 1) and wait until the broker has it."""
        message = Status(v=1, order_id=order_id, status=status, reason=None, at=now_ms())  # type: ignore[arg-type]
        info = self._client.publish(names.status_topic(device_id), encode(message), qos=1)
        info.wait_for_publish(10)

    def _on_connect(self, client: paho.Client, *_args: Any) -> None:
        client.subscribe(names.ORDERS_TOPIC_FILTER, qos=1)
        client.subscribe(names.TOPIC_PREFIX + "+/status-query", qos=1)
        self.subscribed.set()

    def _on_disconnect(self, *_args: Any) -> None:
        self.subscribed.clear()

    def _on_message(self, client: paho.Client, _userdata: Any, msg: paho.MQTTMessage) -> None:
        if msg.topic.endswith("/status-query"):
            self._on_query(client, msg)
            return
        device_id = names.device_id_from_orders_topic(msg.topic)
        order = decode_order(msg.payload, topic_device_id=device_id)
        with self._lock:
            self.seen[order.order_id] += 1
            self.seqs[order.order_id] = order.seq
            count = self.seen[order.order_id]
        answer = self.policy(order.order_id, count)
        if answer is None:
            return
        result, reason = answer
        now = now_ms()
        receipt = Receipt(v=1, order_id=order.order_id, result=result, reason=reason, at=now)  # type: ignore[arg-type]
        client.publish(names.receipts_topic(device_id), encode(receipt), qos=1)
        if self.send_status and result == "accepted":
            status = Status(v=1, order_id=order.order_id, status="confirmed", reason=None, at=now)
            client.publish(names.status_topic(device_id), encode(status), qos=1)

    def _on_query(self, client: paho.Client, msg: paho.MQTTMessage) -> None:
        device_id = msg.topic[len(names.TOPIC_PREFIX) :].split("/")[0]
        assert msg.topic == names.status_query_topic(device_id)
        query = decode_status_query(msg.payload)
        with self._lock:
            self.queries.append(query.order_ids)
            known = [order_id for order_id in query.order_ids if order_id in self.seen]
        if not self.answer_queries:
            return
        for order_id in known:
            status = Status(
                v=1,
                order_id=order_id,
                status=self.query_status,  # type: ignore[arg-type]
                reason=None,
                at=now_ms(),
            )
            client.publish(names.status_topic(device_id), encode(status), qos=1)
