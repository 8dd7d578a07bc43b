"""Status messages over gmqtt: an asyncio-native publisher, no thread, PUBACKs per batch.

paho-mqtt runs its network loop in a thread and tops out near 5k messages/s
per process here (the thread and the event loop share the GIL); gmqtt lives
in the event loop. gmqtt keeps every unacknowledged QoS 1 PUBLISH in its
``persistent_storage`` and sends it again after a reconnect, but it has no
PUBACK callback: :class:`_AckTracker` is that store, and it wakes the
publisher whenever one is acknowledged.

Messages go through a bounded backlog to a pump task that keeps at most
``window`` of them in flight (below the broker's Receive Maximum, which
gmqtt enforces by raising ``OverflowError``). ``publish`` waits until the
backlog and the in-flight store are both empty (everything acknowledged) or
the timeout passes; messages not acknowledged in time stay queued and go out
after a reconnect, as with the paho publisher.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections import deque
from collections.abc import Sequence
from types import TracebackType
from typing import Any, Self

import structlog
from gmqtt import Client
from gmqtt.mqtt.handler import MQTTConnectError
from gmqtt.storage import PersistentStorage

from schemas import Status, encode
from schemas.names import status_topic
from servicekit.urls import MqttUrl

log = structlog.get_logger(__name__)
CONNECT_TIMEOUT_S = 10.0
MAX_CONNECT_BACKOFF_S = 30.0
RECONNECT_DELAY_S = 1


class _AckTracker(PersistentStorage):  # type: ignore[misc]
    """gmqtt's store of in-flight QoS 1 messages, which also reports every PUBACK."""

    def __init__(self, on_ack: Any) -> None:
        super().__init__()
        self._on_ack = on_ack

    # Not __len__: gmqtt takes ``persistent_storage or PersistentStorage()``,
    # and an empty store with __len__ would be falsy and silently replaced.
    @property
    def size(self) -> int:
        """Messages in flight (sent, not yet acknowledged)."""
        return len(self._messages)

    def remove_message_by_mid(self, mid: int) -> None:
        super().remove_message_by_mid(mid)
        self._on_ack()


class GmqttStatusPublisher:
    """A gmqtt client (MQTT 5) that publishes Status messages at QoS 1 and waits for PUBACKs."""

    def __init__(
        self,
        url: str,
        client_id: str,
        *,
        ack_timeout_s: float = 5.0,
        window: int = 500,
        max_backlog: int = 100_000,
        ca_file: str = "",
    ) -> None:
        self._url = MqttUrl.parse(url)
        self._ssl = self._url.ssl_context(ca_file) or False
        self._ack_timeout_s = ack_timeout_s
        self._window = max(1, window)
        self._backlog: deque[tuple[str, bytes]] = deque()
        self._max_backlog = max_backlog
        self._store = _AckTracker(self._on_ack)
        self._client = Client(client_id, persistent_storage=self._store)
        self._client.on_connect = self._on_connect
        # gmqtt reconnects by itself after a drop; its default pause is 6 s.
        self._client.set_config({"reconnect_delay": RECONNECT_DELAY_S})
        self._wake = asyncio.Event()  # the pump has something to do
        self._idle = asyncio.Event()  # nothing queued, nothing in flight
        self._idle.set()
        self._connected = asyncio.Event()
        self._batch_lock = asyncio.Lock()
        self._tasks: list[asyncio.Task[None]] = []
        self._entered = False

    async def __aenter__(self) -> Self:
        if self._entered:
            raise RuntimeError("GmqttStatusPublisher cannot be re-entered")
        self._entered = True
        if self._url.username:
            self._client.set_auth_credentials(self._url.username, self._url.password)
        self._tasks = [
            asyncio.create_task(self._connect_loop(), name="status-connect"),
            asyncio.create_task(self._pump(), name="status-pump"),
        ]
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                await self._connected.wait()
        except TimeoutError:
            log.warning("mqtt_not_connected_yet", url=str(self._url))
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._client.is_connected:
            await self._client.disconnect()

    async def publish(self, messages: Sequence[tuple[str, Status]]) -> int:
        """Queue all, then wait (up to the timeout) until the broker acked every one."""
        if not messages:
            return 0
        async with self._batch_lock:  # one batch at a time
            for device_id, status in messages:
                self._backlog.append((status_topic(device_id), encode(status)))
            if len(self._backlog) > self._max_backlog:
                dropped = len(self._backlog) - self._max_backlog
                for _ in range(dropped):
                    self._backlog.popleft()
                log.error("status_backlog_full_dropped_oldest", dropped=dropped)
            self._idle.clear()
            self._wake.set()
            try:
                async with asyncio.timeout(self._ack_timeout_s):
                    await self._idle.wait()
            except TimeoutError:
                unacked = min(len(messages), len(self._backlog) + self._store.size)
                log.warning("status_puback_timeout", unacked=unacked, total=len(messages))
                return len(messages) - unacked
            return len(messages)

    @property
    def connected(self) -> bool:
        """Connected to the broker (CONNACK received) right now."""
        return bool(self._client.is_connected)

    @property
    def in_flight(self) -> int:
        """Status messages queued or sent and not yet acknowledged by the broker."""
        return len(self._backlog) + self._store.size

    async def _pump(self) -> None:
        """Hand backlog messages to gmqtt while connected, at most ``window`` in flight."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._backlog and self._client.is_connected and self._store.size < self._window:
                topic, payload = self._backlog[0]
                try:
                    self._client.publish(topic, payload, qos=1)
                except OverflowError:
                    break  # the broker's Receive Maximum is lower than our window
                self._backlog.popleft()
            self._check_idle()

    def _check_idle(self) -> None:
        if not self._backlog and not self._store.size:
            self._idle.set()

    def _on_ack(self) -> None:
        self._wake.set()

    def _on_connect(self, *_args: Any) -> None:
        self._connected.set()
        self._wake.set()

    async def _connect_loop(self) -> None:
        """Connect, retrying with capped, jittered backoff; gmqtt reconnects by itself after."""
        attempt = 0
        while True:
            try:
                await self._client.connect(
                    self._url.host, self._url.port, ssl=self._ssl, keepalive=30
                )
            except (OSError, TimeoutError, MQTTConnectError) as exc:
                attempt += 1
                delay_s = random.uniform(0, min(MAX_CONNECT_BACKOFF_S, 0.2 * 2**attempt))
                log.warning("mqtt_connect_failed", error=repr(exc), retry_in_s=round(delay_s, 2))
                await asyncio.sleep(delay_s)
            else:
                return
