"""Status messages back to devices: a Protocol, its paho-mqtt implementation, and the choice.

paho runs its network loop in a thread; its callbacks hand results to the
event loop with ``call_soon_threadsafe`` and touch no other state.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from types import TracebackType
from typing import Any, Protocol, Self

import paho.mqtt.client as mqtt
import structlog
from paho.mqtt.enums import CallbackAPIVersion

from schemas import Status, encode
from schemas.names import status_topic
from servicekit.urls import MqttUrl

from .config import PipelineConfig
from .errors import PipelineError
from .status_gmqtt import GmqttStatusPublisher

log = structlog.get_logger(__name__)
CONNECT_TIMEOUT_S = 10.0


class StatusPublisher(Protocol):
    """Publishes Status messages at QoS 1 to ``v1/devices/{id}/status``."""

    async def publish(self, messages: Sequence[tuple[str, Status]]) -> int:
        """Publish ``(device_id, status)`` pairs; return how many the broker acked in time."""


class MqttStatusPublisher:
    """A paho-mqtt 2.x client (MQTT 5) that waits for a batch's PUBACKs, with a timeout.

    Messages not acked in time stay queued in paho and go out after a
    reconnect; the caller logs them and carries on, so a broker outage does not
    stop the pipeline (a redelivered order publishes its status again).
    """

    def __init__(
        self, url: str, client_id: str, *, ack_timeout_s: float = 5.0, ca_file: str = ""
    ) -> None:
        self._url = MqttUrl.parse(url)
        self._ca_file = ca_file
        self._ack_timeout_s = ack_timeout_s
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5
        )
        self._client.max_queued_messages_set(100_000)
        self._client.max_inflight_messages_set(1000)
        self._client.reconnect_delay_set(min_delay=1, max_delay=30)
        self._client.on_publish = self._on_publish
        self._client.on_connect = self._on_connect
        self._lock = threading.Lock()  # guards the four fields below (paho thread vs loop)
        self._outstanding: set[int] = set()
        self._early: set[int] = set()
        self._sealed = False
        self._batch_done: asyncio.Event | None = None
        self._batch_lock = asyncio.Lock()
        self._connected = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._entered = False

    async def __aenter__(self) -> Self:
        if self._entered:
            raise RuntimeError("MqttStatusPublisher cannot be re-entered")
        self._entered = True
        self._loop = asyncio.get_running_loop()
        if self._url.username:
            self._client.username_pw_set(self._url.username, self._url.password)
        if self._url.tls:
            self._client.tls_set(ca_certs=self._ca_file or None)
        self._client.connect_async(self._url.host, self._url.port, keepalive=30)
        self._client.loop_start()
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
        await asyncio.to_thread(self._client.disconnect)
        await asyncio.to_thread(self._client.loop_stop)

    async def publish(self, messages: Sequence[tuple[str, Status]]) -> int:
        """Publish all, then wait (up to the timeout) until the broker acked every one."""
        if not messages:
            return 0
        assert self._loop is not None, "use `async with`"
        async with self._batch_lock:  # one batch in flight at a time
            done = asyncio.Event()
            with self._lock:
                self._outstanding = set()
                self._early = set()
                self._sealed = False
                self._batch_done = done
            for device_id, status in messages:
                info = self._client.publish(status_topic(device_id), encode(status), qos=1)
                with self._lock:
                    if info.mid in self._early:
                        self._early.discard(info.mid)
                    else:
                        self._outstanding.add(info.mid)
            with self._lock:
                self._sealed = True
                if not self._outstanding:
                    done.set()
            try:
                async with asyncio.timeout(self._ack_timeout_s):
                    await done.wait()
            except TimeoutError:
                with self._lock:
                    unacked = len(self._outstanding)
                # paho keeps them queued and resends after a reconnect.
                log.warning("status_puback_timeout", unacked=unacked, total=len(messages))
                return len(messages) - unacked
            finally:
                with self._lock:
                    self._batch_done = None
            return len(messages)

    def _on_connect(self, _c: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any = None) -> None:
        if not reason.is_failure and self._loop is not None:
            self._loop.call_soon_threadsafe(self._connected.set)

    def _on_publish(self, _c: mqtt.Client, _u: Any, mid: int, _r: Any, _p: Any = None) -> None:
        # paho's network thread: bookkeeping under the lock, and one wake-up of the
        # event loop per batch (not per PUBACK), which is what keeps this cheap.
        with self._lock:
            if mid in self._outstanding:
                self._outstanding.discard(mid)
                batch_done = self._batch_done
                if self._sealed and not self._outstanding and batch_done and self._loop:
                    self._loop.call_soon_threadsafe(batch_done.set)
            elif self._batch_done is not None and not self._sealed:
                self._early.add(mid)  # acked before publish() saw its mid


def status_publisher(
    config: PipelineConfig, client_id: str
) -> MqttStatusPublisher | GmqttStatusPublisher:
    """The publisher ``config.status_client`` names (``gmqtt``, the default, or ``paho``)."""
    if config.status_client == "paho":
        return MqttStatusPublisher(
            config.mqtt_url,
            client_id,
            ack_timeout_s=config.status_ack_timeout_s,
            ca_file=config.mqtt_ca_file,
        )
    if config.status_client != "gmqtt":
        raise PipelineError("unknown_status_client", f"status_client {config.status_client!r}")
    return GmqttStatusPublisher(
        config.mqtt_url,
        client_id,
        ack_timeout_s=config.status_ack_timeout_s,
        window=config.status_window,
        ca_file=config.mqtt_ca_file,
    )
