"""An :class:`bridge.intake.Intake` on gmqtt (``--mqtt-client gmqtt``).

gmqtt is asyncio-native:
with ``optimistic_acknowledgement=False`` it runs an ``async def`` on_message as
a task and sends the PUBACK from the task's done-callback only when the
coroutine returned 0. A handler that raises or is cancelled is never acked,
and the broker redelivers the message on the next session. Each message is a
task and each PUBACK or receipt its own socket write, which caps it near
20k msg/s here (``bench/mqtt_clients.py``).

gmqtt silently falls back to MQTT 3.1.1, and then to acking on receipt, when a
broker refuses MQTT 5; :class:`GmqttIntake` refuses to run in that case.
"""

from __future__ import annotations

import asyncio
import random
from types import TracebackType
from typing import Any, Self

import structlog
from gmqtt import Client
from gmqtt.mqtt.constants import UNLIMITED_RECONNECTS, MQTTv50

from schemas.names import shared_orders_subscription
from servicekit.urls import MqttUrl

from .errors import IntakeError
from .intake import MessageSink

log = structlog.get_logger(__name__)

CONNECT_TIMEOUT_S = 10.0
RECONNECT_DELAY_S = 1
PUBLISH_WAIT_S = 10.0
PUBLISH_RETRY_S = 0.002


class GmqttIntake:
    """:class:`~bridge.intake.Intake` on gmqtt; an async context manager that connects."""

    def __init__(
        self,
        url: MqttUrl,
        sink: MessageSink,
        *,
        client_id: str,
        share_group: str,
        session_expiry_s: int,
        receive_maximum: int,
        backoff_max_s: float = 5.0,
        ca_file: str = "",
    ) -> None:
        self._url = url
        self._ssl = url.ssl_context(ca_file) or False
        self._sink = sink
        self._subscription = shared_orders_subscription(share_group)
        self._backoff_max_s = backoff_max_s
        self._acks: set[asyncio.Future[None]] = set()
        self._subscribed = asyncio.Event()
        self._client = Client(
            client_id,
            clean_session=False,
            optimistic_acknowledgement=False,
            session_expiry_interval=session_expiry_s,
            receive_maximum=receive_maximum,
        )
        self._client.set_config(
            {"reconnect_retries": UNLIMITED_RECONNECTS, "reconnect_delay": RECONNECT_DELAY_S}
        )
        if url.username:
            self._client.set_auth_credentials(url.username, url.password)
        self._client.on_message = self._on_message
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_subscribe = self._on_subscribe

    @property
    def connected(self) -> bool:
        return bool(self._client.is_connected) and self._subscribed.is_set()

    def publish(self, topic: str, payload: bytes) -> None:
        if not self.connected:
            raise IntakeError("not connected")
        self._publish_or_retry(topic, payload, attempt=0)

    def _publish_or_retry(self, topic: str, payload: bytes, attempt: int) -> None:
        # gmqtt raises OverflowError when every packet id allowed by the broker's
        # Receive Maximum is in flight; try again shortly, for a bounded time.
        try:
            self._client.publish(topic, payload, qos=1)
        except OverflowError:
            if attempt * PUBLISH_RETRY_S < PUBLISH_WAIT_S:
                asyncio.get_running_loop().call_later(
                    PUBLISH_RETRY_S, self._publish_or_retry, topic, payload, attempt + 1
                )
            else:
                log.warning("receipt dropped: outgoing window stayed full", topic=topic)

    def pause_reading(self) -> None:
        # gmqtt has no flow control; a task per message awaits its ack, and
        # Mosquitto's max_inflight_messages is the only bound on them.
        return

    def resume_reading(self) -> None:
        return

    async def __aenter__(self) -> Self:
        attempt = 0
        while True:
            try:
                async with asyncio.timeout(CONNECT_TIMEOUT_S):
                    await self._client.connect(
                        self._url.host, self._url.port, ssl=self._ssl, version=MQTTv50
                    )
                break
            except (OSError, TimeoutError) as exc:
                delay = random.uniform(0, min(self._backoff_max_s, 0.2 * 2**attempt))
                log.warning("mqtt connect failed, retrying", error=repr(exc), delay_s=delay)
                attempt += 1
                await asyncio.sleep(delay)
        # gmqtt has no public accessor for the negotiated version.
        if self._client._connection_state.protocol_version != MQTTv50:
            await self._client.disconnect()
            raise IntakeError("broker refused MQTT 5: PUBACK-after-write needs it")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._client.disconnect()
        for ack in list(self._acks):
            ack.cancel()  # those messages stay unacked; the broker redelivers

    def _on_connect(self, client: Client, flags: int, rc: int, properties: Any) -> None:
        log.info("mqtt connected", session_present=bool(flags), rc=rc)
        # Subscribing again on a present session is harmless and covers an expired one.
        client.subscribe(self._subscription, qos=1)

    def _on_subscribe(self, client: Client, mid: int, qos: Any, properties: Any) -> None:
        log.info("mqtt subscribed", subscription=self._subscription, granted=list(qos))
        self._subscribed.set()

    def _on_disconnect(self, client: Client, packet: Any, exc: Any = None) -> None:
        self._subscribed.clear()
        log.warning("mqtt disconnected", error=repr(exc) if exc else None)

    async def _on_message(
        self, client: Client, topic: str, payload: bytes, qos: int, properties: Any
    ) -> int:
        acked: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def ack() -> None:
            if not acked.done():
                acked.set_result(None)

        self._acks.add(acked)
        try:
            try:
                self._sink(topic, bytes(payload), ack)
            except Exception:
                log.exception("message not taken", topic=topic)  # stays unacked
                raise
            await acked
        finally:
            self._acks.discard(acked)
        return 0  # gmqtt sends the PUBACK now, reason "success"
