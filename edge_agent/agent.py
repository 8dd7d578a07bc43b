"""EdgeAgent: outbox, publisher, maintenance and HTTP intake under one ``async with``.

::

    async with EdgeAgent(AgentConfig(device_id="kiosk-7", db="outbox.db")) as agent:
        result = await agent.submit({"currency": "EUR", "items": [...], "total": 500})
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import secrets
import time
from collections.abc import Mapping
from concurrent.futures import Executor
from types import TracebackType
from typing import Any, Final, Self

import msgspec
import structlog

import schemas
from servicekit.clock import now_ms

from ._records import NewOrder, OrderRecord, Submitted
from .config import AgentConfig
from .errors import AgentClosed, AgentError, InvalidOrder, StorageError
from .intake import start_http
from .metrics import AgentMetrics
from .outbox import Outbox
from .publisher import Publisher
from .transport import TransportFactory, default_transport

log = structlog.get_logger(__name__)

# Keys the agent sets itself; a client sending them is told so.
AGENT_KEYS: Final = ("v", "device_id", "seq", "created_at")


def new_order_id() -> str:
    """A time-ordered id: 12 hex digits of ms, then 80 random bits (like UUIDv7)."""
    return f"{now_ms():012x}{secrets.token_hex(10)}"


class Health(msgspec.Struct, frozen=True):
    """What ``/healthz`` shows."""

    ok: bool
    device_id: str
    broker_connected: bool
    mqtt_protocol: str
    outbox_depth: int
    outbox_bytes: int
    oldest_unreceipted_age_s: float | None
    inflight: int
    storage_error: str | None
    broker_error: str | None
    last_broker_rejection: str | None
    expired_unreceipted: int


class EdgeAgent:
    """One device's agent. Reusable after exit, but not re-entrant.

    Args:
        config: the settings.
        transport_factory: the MQTT implementation (tests and the simulator plug in theirs).
        executor: a writer thread shared with other agents; default: one of its own.
        inline_storage: run SQLite on the event loop (for ``db=":memory:"``).
    """

    def __init__(
        self,
        config: AgentConfig,
        *,
        transport_factory: TransportFactory = default_transport,
        executor: Executor | None = None,
        inline_storage: bool = False,
    ) -> None:
        self.config = config
        self.metrics = AgentMetrics()
        self.outbox = Outbox(
            config.db,
            max_rows=config.max_rows,
            max_bytes=config.max_bytes,
            executor=executor,
            inline=inline_storage,
            batch_max=config.batch_max,
        )
        self.publisher = Publisher(
            config, self.outbox, self.metrics, transport_factory=transport_factory
        )
        self.outbox.on_commit = self.publisher.wake
        self.http_port: int | None = None
        self._tg: asyncio.TaskGroup | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._runner: Any = None
        self._closing = False
        self.expired_unreceipted = 0
        self.metrics.bind(
            pending=lambda: self.outbox.store.pending_rows,
            pending_bytes=lambda: self.outbox.store.pending_bytes,
            storage_error=lambda: 0 if self.outbox.error is None else 1,
            inflight=lambda: self.publisher.inflight,
            connected=lambda: 1 if self.publisher.connected else 0,
        )

    async def __aenter__(self) -> Self:
        if self._tg is not None:
            raise RuntimeError("EdgeAgent is not re-entrant")
        self._closing = False
        # Our tasks log with this device's id; the caller's context stays untouched,
        # so many agents can share one process (the fleet simulator).
        context = contextvars.copy_context()
        context.run(structlog.contextvars.bind_contextvars, device_id=self.config.device_id)
        await self.outbox.__aenter__()
        if self.config.http_enabled:
            # Intake first: if its port is taken, nothing else (no MQTT session) has started.
            try:
                self._runner, self.http_port = await start_http(self)
            except OSError as exc:
                await self.outbox.__aexit__(type(exc), exc, exc.__traceback__)
                where = f"{self.config.http_host}:{self.config.http_port}"
                raise AgentError(f"cannot listen on {where}: {exc}", reason="http_bind") from exc
        self._tg = asyncio.TaskGroup()
        await self._tg.__aenter__()
        name = self.config.device_id
        self._tasks = [
            self._tg.create_task(self.publisher.run(), name=f"publisher:{name}", context=context),
            self._tg.create_task(self._maintain(), name=f"maintenance:{name}", context=context),
        ]
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._closing = True
        try:
            if self._runner is not None:
                await self._runner.cleanup()  # stop intake first: no new orders
                self._runner = None
            for task in self._tasks:
                task.cancel()
            if self._tg is not None:
                tg, self._tg = self._tg, None
                # Children we cancelled end quietly; a cancellation of our caller propagates.
                await tg.__aexit__(None, None, None)
        finally:
            # The outbox commits what is pending (the transaction in progress), then closes.
            await self.outbox.__aexit__(exc_type, exc, tb)
            await self.publisher.close()
            log.info("agent_stopped")

    async def submit(self, data: Mapping[str, Any]) -> Submitted:
        """Validate an order and commit it to the outbox; return once it is durable.

        ``data`` is the intake JSON: ``currency``, ``items``, ``total``,
        optional ``attrs`` and ``order_id`` (the idempotency key; generated
        when absent). The same ``order_id`` again returns the first answer.

        Raises:
            InvalidOrder: bad input (names the field); OutboxFull: at the cap;
            StorageError: the disk refuses writes; AgentClosed: shutting down.
        """
        if self._closing:
            raise AgentClosed("the agent is shutting down")
        try:
            order, payload = self.encode(data, seq=self.outbox.reserve_seq())
            result = await self.outbox.submit(NewOrder(order.order_id, order.seq, payload))
        except AgentError as exc:
            self.metrics.refused.labels(exc.reason).inc()
            raise
        if result.duplicate:
            self.metrics.duplicates.inc()
        else:
            self.metrics.submitted.inc()
        return result

    def validate(self, data: Mapping[str, Any], *, seq: int = 0) -> schemas.Order:
        """Build the wire Order the agent will send, or raise :class:`InvalidOrder`."""
        return self.encode(data, seq=seq)[0]

    def encode(self, data: Mapping[str, Any], *, seq: int) -> tuple[schemas.Order, bytes]:
        """Validate ``data`` into the wire Order with ``seq`` and its MessagePack payload.

        Raises:
            InvalidOrder: with the contract's reason code and the field at fault.
        """
        if not isinstance(data, dict | Mapping):
            raise InvalidOrder("an order must be a JSON object", reason="malformed", field="$")
        for key in AGENT_KEYS:
            if key in data:
                raise InvalidOrder(f"{key} is set by the agent", field=f"$.{key}")
        full = {
            **data,
            "v": 1,
            "device_id": self.config.device_id,
            "seq": seq,
            "created_at": now_ms(),
        }
        if full.get("order_id") is None:
            full["order_id"] = new_order_id()
        try:
            # Fast path: one convert, one encode. On any failure the codec's
            # build_order produces the contract's reason code and field.
            order = msgspec.convert(full, schemas.Order)
            return order, schemas.encode(order)
        except (msgspec.ValidationError, schemas.SchemaError):
            pass
        try:
            order = schemas.build_order(full)
        except schemas.DecodeError as exc:
            raise InvalidOrder(exc.detail, reason=exc.reason, field=exc.field) from exc
        return order, schemas.encode(order)  # pragma: no cover - build_order raised above

    async def get(self, order_id: str) -> OrderRecord | None:
        """An order's local state, or None."""
        return await self.outbox.get(order_id)

    async def list_orders(
        self, state: str | None = None, cursor: int | None = None, limit: int = 50
    ) -> tuple[list[OrderRecord], int | None]:
        """A page of orders, newest first, and the cursor of the next page (or None)."""
        rows = await self.outbox.page(state, cursor, limit + 1)
        more = len(rows) > limit
        rows = rows[:limit]
        return rows, (rows[-1].seq if more and rows else None)

    async def health(self) -> Health:
        """Broker connection, outbox depth and age, and any storage error."""
        stats = None
        with contextlib.suppress(StorageError):
            stats = await self.outbox.stats()
        error = self.outbox.error
        oldest = stats.oldest_pending_ms if stats else None
        return Health(
            ok=error is None and self.outbox.available,
            device_id=self.config.device_id,
            broker_connected=self.publisher.connected,
            mqtt_protocol=self.publisher.protocol,
            outbox_depth=self.outbox.store.pending_rows,
            outbox_bytes=self.outbox.store.pending_bytes,
            oldest_unreceipted_age_s=None if oldest is None else max(0, now_ms() - oldest) / 1000,
            inflight=self.publisher.inflight,
            storage_error=None if error is None else f"{error.reason}: {error.detail}",
            broker_error=self.publisher.last_error,
            last_broker_rejection=self.publisher.last_rejection,
            expired_unreceipted=self.expired_unreceipted,
        )

    async def _maintain(self) -> None:
        """Reopen a failed outbox, and prune receipted orders past retention."""
        cfg = self.config
        next_prune = time.monotonic() + min(cfg.prune_interval_s, 5.0)
        while True:
            await asyncio.sleep(min(cfg.storage_retry_s, cfg.prune_interval_s))
            if not self.outbox.available:
                if await self.outbox.try_open():
                    self.publisher.wake()
                continue
            if time.monotonic() >= next_prune:
                next_prune = time.monotonic() + cfg.prune_interval_s
                await self._expire()
                await self.outbox.prune(now_ms() - int(cfg.retention_s * 1000))

    async def _expire(self) -> None:
        expired = await self.outbox.expire(now_ms() - int(self.config.resend_max_age_s * 1000))
        if expired:
            self.expired_unreceipted += len(expired)
            self.metrics.expired.inc(len(expired))
            log.error(
                "orders_unreceipted_expired",
                count=len(expired),
                order_ids=expired[:20],
                max_age_s=self.config.resend_max_age_s,
            )
