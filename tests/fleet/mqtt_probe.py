"""A synchronous MQTT 5 test client that records what the broker answered."""

from __future__ import annotations

import ssl
import threading
from pathlib import Path
from types import TracebackType
from typing import Self

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

WAIT_S = 5.0


class Probe:
    """Connects, publishes and subscribes, keeping the broker's reason codes."""

    def __init__(
        self,
        port: int,
        username: str | None = None,
        password: str | None = None,
        *,
        ca_file: Path | None = None,
        client_cert: tuple[Path, Path] | None = None,
        client_id: str | None = None,
    ) -> None:
        self.port = port
        self.connack: ReasonCode | None = None
        self.suback: list[ReasonCode] = []
        self.messages: list[mqtt.MQTTMessage] = []
        self.pubacks: dict[int, int] = {}
        self._connected = threading.Event()
        self.disconnected = threading.Event()
        self.disconnect_reason: ReasonCode | None = None
        self._subscribed = threading.Event()
        self._message = threading.Condition()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id or "", protocol=mqtt.MQTTv5
        )
        if username is not None:
            self.client.username_pw_set(username, password)
        if ca_file is not None:
            cert, key = (str(path) for path in client_cert) if client_cert else (None, None)
            self.client.tls_set(
                ca_certs=str(ca_file), certfile=cert, keyfile=key,
                tls_version=ssl.PROTOCOL_TLS_CLIENT,
            )  # fmt: skip
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        self.client.on_publish = self._on_publish
        self.client.on_disconnect = self._on_disconnect

    def __enter__(self) -> Self:
        self.client.connect("127.0.0.1", self.port)
        self.client.loop_start()
        self._connected.wait(WAIT_S)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.client.disconnect()
        self.client.loop_stop()
        # paho closes its wake-up socket pair only in __del__; when a cycle
        # makes the GC reach the sockets first, Python warns about them.
        self.client._reset_sockets()

    def subscribe(self, topic: str) -> ReasonCode:
        """Subscribe at QoS 1 and return the SUBACK reason code."""
        self._subscribed.clear()
        self.client.subscribe(topic, qos=1)
        assert self._subscribed.wait(WAIT_S), "no SUBACK"
        return self.suback[-1]

    def publish(self, topic: str, payload: bytes) -> int:
        """Publish at QoS 1 and return the PUBACK reason code (0 = success)."""
        info = self.client.publish(topic, payload, qos=1)
        info.wait_for_publish(WAIT_S)
        with self._message:
            assert self._message.wait_for(lambda: info.mid in self.pubacks, WAIT_S), "no PUBACK"
            return self.pubacks[info.mid]

    def wait_messages(self, count: int, timeout_s: float = WAIT_S) -> list[mqtt.MQTTMessage]:
        """Wait until ``count`` messages arrived (or the timeout) and return them all."""
        with self._message:
            self._message.wait_for(lambda: len(self.messages) >= count, timeout_s)
            return list(self.messages)

    def _on_publish(
        self, _c: mqtt.Client, _u: object, mid: int, rc: ReasonCode, _p: Properties | None
    ) -> None:
        with self._message:
            self.pubacks[mid] = rc.value
            self._message.notify_all()

    def _on_disconnect(
        self, _c: mqtt.Client, _u: object, _f: object, rc: ReasonCode, _p: Properties | None
    ) -> None:
        self.disconnect_reason = rc
        self.disconnected.set()

    def _on_connect(
        self, _c: mqtt.Client, _u: object, _f: object, rc: ReasonCode, _p: Properties | None
    ) -> None:
        self.connack = rc
        self._connected.set()

    def _on_subscribe(
        self, _c: mqtt.Client, _u: object, _mid: int, rcs: list[ReasonCode], _p: Properties | None
    ) -> None:
        self.suback.extend(rcs)
        self._subscribed.set()

    def _on_message(self, _c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        with self._message:
            self.messages.append(msg)
            self._message.notify_all()
