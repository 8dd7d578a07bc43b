"""EdgeAgent: outbox, publisher, status recovery, commands, upkeep, intake in one ``async with``.

Every background loop is a named task in one ``asyncio.TaskGroup``. A loop
survives any fault it can outlast (broker, disk, storage errors: it retries
with ``servicekit.backoff`` and resets after a success). A loop that ends
anyway (a bug) logs ``background_loop_died`` naming it, and the group then
stops the agent: ``__aexit__`` raises :class:`BackgroundLoopDied` and the
``edge-agent`` command exits non-zero, so systemd restarts it.

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
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import Executor
from types import TracebackType
from typing import Any, Final, Self

import msgspec
import structlog

import schemas
from servicekit.backoff import Backoff
from servicekit.clock import now_ms

from ._clock import AgentClock
from ._records import NewOrder, OrderRecord, RetryResult, Stats, Submitted
from .commands import Commands
from .config import AgentConfig
from .errors import AgentClosed, AgentError, BackgroundLoopDied, InvalidOrder, StorageError
from .health import HealthReporter
from .intake import start_http
from .metrics import AgentMetrics
from .outbox import Outbox
from .publisher import Publisher
from .status_recovery import StatusRecovery
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
    held: int = 0
    awaiting_status: int = 0
    status_never_heard: int = 0
    # Geo mode (None/0 in single-region mode): the region in use, region changes so
    # far, and unreceipted orders whose last answer was `pending`: the authority region
    # unreachable, or (awaiting_unknown_region, a configuration mistake) a bridge that does
    # not know it; both land by themselves once the cause is fixed.
    region: str | None = None
    failovers: int = 0
    failbacks: int = 0
    awaiting_authority: int = 0
    awaiting_unknown_region: int = 0


class EdgeAgent:
    """One device's agent. Reusable after exit, but not re-entrant.

    Args:
        config: the settings.
        transport_factory: the MQTT implementation (tests and the simulator plug in theirs).
        executor: a writer thread shared with other agents; default: one of its own.
        inline_storage: run SQLite on the event loop (for ``db=":memory:"``).
        clock: the agent clock (tests inject wall and monotonic clocks).
    """

    def __init__(
        self,
        config: AgentConfig,
        *,
        transport_factory: TransportFactory = default_transport,
        executor: Executor | None = None,
        inline_storage: bool = False,
        clock: AgentClock | None = None,
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
            clock=clock,
        )
        self.clock = self.outbox.clock
        self.reporter = HealthReporter(config, self.outbox, self.metrics)
        # Device commands (retry_held) come in on the publisher's connection.
        self.commands = Commands(
            config.device_id, self.metrics, self.retry_held, retry_s=config.storage_retry_s
        )
        self.publisher = Publisher(
            config,
            self.outbox,
            self.metrics,
            transport_factory=self.reporter.wrap(transport_factory),
            commands=self.commands,
        )
        self.recovery = StatusRecovery(config, self.outbox, self.publisher, self.metrics)
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
            held=lambda: self.outbox.store.held_rows,
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
        loops = {
            "publisher": self.publisher.run,
            "status_recovery": self.recovery.run,
            "maintenance": self._maintain,
            "commands": self.commands.run,
            "outbox_writer": self.outbox.writer_finished,
        }
        if self.publisher.regions is not None:
            loops["failback_probe"] = self.publisher.run_failback_probe
        if self.reporter.enabled:
            loops["health"] = self.reporter.run
        self._tasks = [
            self._tg.create_task(
                self._supervised(loop, run), name=f"{loop}:{name}", context=context
            )
            for loop, run in loops.items()
        ]
        return self

    async def _supervised(self, loop: str, run: Callable[[], Awaitable[None]]) -> None:
        """Run one background loop; its end (an error, or a return) ends the agent, loudly."""
        try:
            await run()
        except Exception as exc:
            log.critical("background_loop_died", loop=loop, exc_info=True)
            raise BackgroundLoopDied(loop, f"{type(exc).__name__}: {exc}") from exc
        if not self._closing:
            log.critical("background_loop_died", loop=loop, error="returned")
            raise BackgroundLoopDied(loop, "returned")

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
                try:
                    await tg.__aexit__(None, None, None)
                except BaseExceptionGroup as group:
                    died = group.subgroup(BackgroundLoopDied)
                    if died is None:
                        raise
                    first = died.exceptions[0]
                    while isinstance(first, BaseExceptionGroup):
                        first = first.exceptions[0]
                    raise first from group
        finally:
            try:
                if await self.reporter.goodbye():  # online=False: DISCONNECT drops the Will
                    log.info("health_goodbye_sent")
            finally:
                # The outbox commits what is pending (the transaction in progress), then closes.
                await self.outbox.__aexit__(exc_type, exc, tb)
                await self.publisher.close()
                log.info("agent_stopped")

    async def submit(self, data: Mapping[str, Any], *, traceparent: str | None = None) -> Submitted:
        """Validate an order and commit it to the outbox; return once it is durable.

        ``data`` is the intake JSON: ``currency``, ``items``, ``total``,
        optional ``attrs`` and ``order_id`` (the idempotency key; generated
        when absent). The same ``order_id`` again returns the first answer.
        ``traceparent``: the order's W3C trace context, stored and sent with it.

        Raises:
            InvalidOrder: bad input (names the field); OutboxFull: at the cap;
            StorageError: the disk refuses writes; AgentClosed: shutting down.
        """
        if self._closing:
            raise AgentClosed("the agent is shutting down")
        try:
            order, payload = self.encode(data, seq=self.outbox.reserve_seq())
            result = await self.outbox.submit(
                NewOrder(order.order_id, order.seq, payload, traceparent)
            )
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
            payload = schemas.encode(order)
            self._check_room_for_attempts(order)
        except (msgspec.ValidationError, schemas.SchemaError):
            pass
        else:
            return order, payload
        try:
            order = schemas.build_order(full)
        except schemas.DecodeError as exc:
            raise InvalidOrder(exc.detail, reason=exc.reason, field=exc.field) from exc
        try:
            self._check_room_for_attempts(order)
        except schemas.SchemaError as exc:
            raise InvalidOrder(
                f"{exc.detail} once the geo attempts are added", reason=exc.reason, field="$"
            ) from exc
        return order, schemas.encode(order)  # pragma: no cover - build_order raised above

    def _check_room_for_attempts(self, order: schemas.Order) -> None:
        """Geo mode: the order must still fit the size cap with every region in ``attempts``."""
        geo = self.publisher.regions
        if geo is not None:
            every = tuple(region.name for region in geo.regions)
            schemas.encode(msgspec.structs.replace(order, attempts=every))

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
            held=self.outbox.store.held_rows,
            awaiting_status=stats.awaiting_status if stats else 0,
            status_never_heard=self.recovery.gave_up,
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
            **self._geo_health(stats),
        )

    def _geo_health(self, stats: Stats | None) -> dict[str, Any]:
        geo = self.publisher.regions
        if geo is None:
            return {}
        return {
            "region": geo.current.name,
            "failovers": geo.failovers,
            "failbacks": geo.failbacks,
            "awaiting_authority": stats.awaiting_authority if stats else 0,
            "awaiting_unknown_region": stats.awaiting_unknown_region if stats else 0,
        }

    async def retry_held(self, order_ids: list[str] | None = None) -> RetryResult:
        """Re-queue held orders (``None``: all of them) once the broker's cause is fixed.

        Orders past the dedup horizon stay held and are listed in
        ``past_horizon``: sending them could duplicate them.

        Raises:
            StorageError: the outbox cannot be read or written.
        """
        result = await self.outbox.retry_held(order_ids, self.publisher.horizon_ms())
        if result.requeued:
            self.metrics.retried_held.inc(len(result.requeued))
            log.info(
                "held_orders_requeued", count=len(result.requeued), order_ids=result.requeued[:20]
            )
            self.publisher.wake()
        if result.past_horizon:
            log.error("held_orders_past_horizon", order_ids=result.past_horizon[:20])
        return result

    async def _maintain(self) -> None:
        """Reopen a failed outbox, save the agent clock, expire and prune; survive any error."""
        cfg = self.config
        trouble = Backoff(cfg.storage_retry_s, max(cfg.storage_retry_s, 60.0))
        next_prune = time.monotonic() + min(cfg.prune_interval_s, 5.0)
        while True:
            await asyncio.sleep(min(cfg.storage_retry_s, cfg.prune_interval_s))
            try:
                next_prune = await self._maintain_once(next_prune)
            except Exception:
                # Isolation boundary: a failed round is logged and counted, the next one runs.
                log.exception("maintenance_failed")
                self.metrics.loop_errors.labels("maintenance").inc()
                await trouble.wait()
            else:
                trouble.reset()

    async def _maintain_once(self, next_prune: float) -> float:
        cfg = self.config
        if not self.outbox.available:
            if await self.outbox.try_open():
                self.publisher.wake()
            return next_prune
        await self.outbox.save_clock()
        if time.monotonic() >= next_prune:
            next_prune = time.monotonic() + cfg.prune_interval_s
            await self._expire()
            await self.outbox.prune(now_ms() - int(cfg.retention_s * 1000))
        return next_prune

    async def _expire(self) -> None:
        # At or before the horizon (agent clock): a resend might be appended twice.
        expired = await self.outbox.expire(self.publisher.horizon_ms())
        if expired:
            self.expired_unreceipted += len(expired)
            self.metrics.expired.inc(len(expired))
            log.error(
                "orders_unreceipted_expired",
                count=len(expired),
                order_ids=expired[:20],
                max_age_s=self.config.resend_max_age_s,
            )
