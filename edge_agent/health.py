"""Device health: a small :class:`schemas.Health` on ``v1/devices/{id}/health``.

The agent tells the cloud how it is doing: outbox depth and bytes, the age of
its oldest unreceipted order, held orders, the last broker error and its
version. It publishes

* every ``health_interval_s`` while connected (the cloud's "last seen"; 300 s
  by default: the Will, not the heartbeat, tells the cloud a device is gone),
* at once on a real change: just connected, the outbox backlog changed its
  order of magnitude (:func:`backlog_level`: fewer than 10, 10–99, 100–999,
  …), the held count moved, a new broker error; checked every
  :data:`CHECK_S`, so a flapping figure costs at most one message a second,
* ``online=False`` with its figures on a clean shutdown, before DISCONNECT.

Its MQTT Will, set at every CONNECT, is ``Health(online=False, at=<connect
time>)`` on the same topic: the broker publishes it when the device vanishes
(power cut, SIGKILL, a dead network past the keep-alive). QoS 1, never
retained: the fleet view lives in Redis with its own TTLs, and a retained
message would announce a decommissioned device's last words to every new
subscriber for ever.

The reporter rides on the publisher's transport through
:meth:`HealthReporter.wrap`, a transport factory decorator: it adds the Will
to the settings and sees connects, connection losses and PUBACKs without a
line in the publisher. Health PUBACKs are kept from the publisher; every
other callback passes through untouched.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import re
import time
from typing import Any, Final

import structlog
from prometheus_client import Counter

import schemas
from schemas import names
from servicekit.backoff import Backoff
from servicekit.clock import now_ms
from servicekit.version import package_version

from .config import AgentConfig
from .errors import BrokerError, StorageError
from .metrics import AgentMetrics
from .outbox import Outbox
from .transport import Transport, TransportFactory, TransportHandlers, TransportSettings

log = structlog.get_logger(__name__)

CHECK_S: Final = 1.0
"""How often the reporter looks for a change (in-memory figures only, no SQLite)."""
BACKLOG_MIN: Final = 10
"""Outbox depth from which a backlog is reported (see :func:`backlog_level`)."""
GOODBYE_TIMEOUT_S: Final = 1.0
"""How long a clean shutdown waits for the broker's PUBACK of ``online=False``."""
_ERROR_TEXT_MAX: Final = 256  # schemas.messages.ShortText
_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def backlog_level(depth: int) -> int:
    """The outbox depth's order of magnitude: 0 below 10, then 1, 2, … per decade.

    A device with sparse orders fills and empties its outbox with every order; that
    is no news for the cloud (issue 25: it made health the fleet's commonest
    message). A backlog that grows or drains by a decade is.
    """
    return 0 if depth < BACKLOG_MIN else len(str(depth)) - 1


def short_text(text: str) -> str:
    """``text`` made a valid ShortText: control characters blanked, at most 256 chars."""
    return _CONTROL.sub(" ", text)[:_ERROR_TEXT_MAX]


class HealthReporter:
    """Publishes this agent's health; run :meth:`run` as a supervised task.

    Args:
        config: the agent's settings (device id, ``health_interval_s``).
        outbox: where the figures come from.
        metrics: the agent's metrics; the reporter adds ``edge_health_*`` to its registry.
    """

    def __init__(self, config: AgentConfig, outbox: Outbox, metrics: AgentMetrics) -> None:
        self._interval_s = config.health_interval_s
        self._outbox = outbox
        self._metrics = metrics
        self.topic = names.health_topic(config.device_id)
        self.version = package_version()
        self._transport: Transport | None = None
        self._health_mids: dict[int, asyncio.Future[int]] = {}
        self._connects = 0  # CONNECTs started; each one gets a fresh Will
        self.last_error: str | None = None
        self._errors = 0  # broker errors seen; a new one is a change worth telling
        self.published = Counter(
            "edge_health_published",
            "Health messages published, by trigger (interval, change, goodbye)",
            ["trigger"],
            registry=metrics.registry,
        )
        self.refused = Counter(
            "edge_health_refused",
            "Health messages the broker refused (PUBACK >= 128: fix the broker ACL)",
            registry=metrics.registry,
        )

    @property
    def enabled(self) -> bool:
        """False with ``health_interval_s = 0``: no reports and no Will."""
        return self._interval_s > 0

    # --- the transport seam ---------------------------------------------------

    def wrap(self, inner: TransportFactory) -> TransportFactory:
        """A transport factory that adds our Will and reports to us, then to the publisher."""
        if not self.enabled:
            return inner

        def factory(settings: TransportSettings, handlers: TransportHandlers) -> Transport:
            settings = dataclasses.replace(settings, will=self.will)
            transport = inner(settings, _Handlers(self, handlers))
            self._transport = _ReportingTransport(self, transport)
            return self._transport

        return factory

    def will(self) -> tuple[str, bytes]:
        """The Will of the CONNECT about to be sent (the transport calls this per CONNECT)."""
        self._connects += 1
        self._forget_mids()  # packet ids belong to a connection
        return self.topic, schemas.encode(schemas.Health(v=1, online=False, at=now_ms()))

    def broker_error(self, text: str) -> None:
        """Record a broker error: a failed connect, a lost connection, a refused PUBLISH."""
        self.last_error = short_text(text)
        self._errors += 1

    def take_puback(self, mid: int, reason_code: int, reason: str) -> bool:
        """True when ``mid`` was a health message (then it is ours, not the publisher's)."""
        done = self._health_mids.pop(mid, None)
        if done is None:
            if reason_code >= 0x80:
                self.broker_error(f"PUBACK {reason_code} {reason}")
            return False
        if reason_code >= 0x80:
            self.refused.inc()
            log.warning("health_refused_by_broker", reason_code=reason_code, reason=reason)
        if not done.done():
            done.set_result(reason_code)
        return True

    def _forget_mids(self) -> None:
        for done in self._health_mids.values():
            if not done.done():
                done.cancel()
        self._health_mids.clear()

    # --- reporting --------------------------------------------------------------

    def _change_key(self) -> tuple[int, int, int, int]:
        store = self._outbox.store
        level = backlog_level(max(0, store.pending_rows))
        return (self._connects, level, store.held_rows, self._errors)

    async def snapshot(self, *, online: bool) -> schemas.Health:
        """The health message now: figures from the outbox (its age needs one SQLite read)."""
        store = self._outbox.store
        oldest_ms = None
        with contextlib.suppress(StorageError):
            stats = await self._outbox.stats()
            oldest_ms = stats.oldest_pending_ms if stats else None
        at = now_ms()
        return schemas.Health(
            v=1,
            online=online,
            at=at,
            outbox_depth=max(0, store.pending_rows),
            outbox_bytes=max(0, store.pending_bytes),
            oldest_unreceipted_age_ms=None if oldest_ms is None else max(0, at - oldest_ms),
            held=max(0, store.held_rows),
            last_broker_error=self.last_error,
            agent_version=short_text(self.version),
        )

    def _publish(self, health: schemas.Health) -> asyncio.Future[int]:
        """Queue one health PUBLISH; its future gets the PUBACK code.

        Raises:
            BrokerError: not connected, or paho refused the publish.
        """
        transport = self._transport
        if transport is None or not transport.connected:
            raise BrokerError("not connected", reason="not_connected")
        mid = transport.publish(self.topic, schemas.encode(health))
        done: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._health_mids[mid] = done
        return done

    async def run(self) -> None:
        """Report every interval and on change, for ever; a failed round is logged and retried."""
        if not self.enabled:
            return
        trouble = Backoff(CHECK_S, 30.0)
        last_key: tuple[int, int, int, int] | None = None
        next_due = 0.0
        while True:
            transport = self._transport
            key = self._change_key()
            now = time.monotonic()
            due = key != last_key or now >= next_due
            if transport is not None and transport.connected and due:
                trigger = "interval" if key == last_key else "change"
                try:
                    self._publish(await self.snapshot(online=True))
                except BrokerError:
                    pass  # the connection went; the next CONNECT is a change
                except Exception:
                    # Isolation boundary: health must never stop the agent taking orders.
                    log.exception("health_report_failed")
                    self._metrics.loop_errors.labels("health").inc()
                    await trouble.wait()
                    continue
                else:
                    self.published.labels(trigger).inc()
                    trouble.reset()
                    last_key, next_due = key, now + self._interval_s
            await asyncio.sleep(CHECK_S)

    async def goodbye(self, timeout_s: float = GOODBYE_TIMEOUT_S) -> bool:
        """On a clean shutdown: publish ``online=False`` and wait for its PUBACK.

        The DISCONNECT that follows discards the Will, so this is the cloud's
        only word that we left. Returns whether the broker took it in time.
        """
        if not self.enabled:
            return False
        try:
            done = self._publish(await self.snapshot(online=False))
        except BrokerError:
            return False
        except Exception:
            log.exception("health_goodbye_failed")  # shutdown goes on; the cloud's TTL copes
            return False
        # wait() neither raises the future's cancellation (connection lost) nor hides ours.
        await asyncio.wait({done}, timeout=timeout_s)
        if not done.done() or done.cancelled():
            return False
        self.published.labels("goodbye").inc()
        return done.result() < 0x80


class _Handlers:
    """The publisher's handlers, with health PUBACKs and broker errors seen first."""

    def __init__(self, reporter: HealthReporter, inner: TransportHandlers) -> None:
        self._reporter = reporter
        self._inner = inner

    def on_puback(self, mid: int, reason_code: int, reason: str) -> None:
        if not self._reporter.take_puback(mid, reason_code, reason):
            self._inner.on_puback(mid, reason_code, reason)

    def on_message(self, topic: str, payload: bytes) -> None:
        self._inner.on_message(topic, payload)

    def on_connection_lost(self, reason: str) -> None:
        self._reporter.broker_error(f"connection lost: {reason}")
        self._inner.on_connection_lost(reason)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class _ReportingTransport:
    """The real transport, with failed connects recorded as broker errors."""

    def __init__(self, reporter: HealthReporter, inner: Transport) -> None:
        self._reporter = reporter
        self._inner = inner

    @property
    def connected(self) -> bool:
        return self._inner.connected

    @property
    def protocol(self) -> str:
        return self._inner.protocol

    async def connect(self) -> bool:
        try:
            return await self._inner.connect()
        except BrokerError as exc:
            self._reporter.broker_error(exc.detail)
            raise

    def publish(self, topic: str, payload: bytes, *args: Any, **kwargs: Any) -> int:
        return self._inner.publish(topic, payload, *args, **kwargs)

    async def disconnect(self) -> None:
        await self._inner.disconnect()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)  # whatever else the transport offers
