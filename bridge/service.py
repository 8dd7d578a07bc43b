"""The bridge: wire intake, validation, batcher, receipts and the ops endpoints together.

Per message: rate limit → validate → batch → Redis (order or dead letter) →
receipt → ack (the intake's PUBACK). Nothing is acked before Redis holds it;
on SIGTERM the bridge stops taking messages (leaves them unacked), writes what
it holds, acks that, and leaves the rest to the broker's session.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import structlog

from schemas import Reason, SchemaError
from schemas.ids import is_device_id
from schemas.names import (
    TRACEPARENT_PROPERTY,
    device_id_from_orders_topic,
    shared_orders_subscription,
)
from servicekit.backoff import Backoff
from servicekit.clock import now_ms
from servicekit.layout import LayoutError
from servicekit.logs import truncate
from servicekit.loops import critical
from servicekit.mqtt import PropertySubscription
from servicekit.rate_limit import TokenBuckets
from servicekit.urls import MqttUrl, parse_mqtt_urls

from .batcher import Batcher, Outcome
from .brokers import BrokerSet
from .config import BridgeConfig
from .dlq_budget import DeadLetterBudget, dlq_entries
from .errors import IntakeError, RedisAuthError, RedisFullError, StoreError
from .heartbeat import HeartbeatStore, run_heartbeat
from .http import HttpServer
from .ingest import DeadLetter, ValidOrder, classify, order_id_hint
from .intake import Ack, Intake, IntakeFactory, MessageSink, MqttIntake
from .metrics import BridgeMetrics
from .receipts import receipt_bytes
from .regions import Regions
from .store import OrderSink, RedisSink, RedisState

log = structlog.get_logger(__name__)

REDIS_PROBE_INTERVAL_S = 1.0


class Bridge:
    """One bridge replica: ``Bridge(config, sink, metrics)``, then ``await run()``.

    With a ``heartbeat`` store it reports its readiness there every
    ``config.heartbeat_interval_s`` for the ops page (:mod:`bridge.heartbeat`).

    In geo mode ``region_sinks`` holds a sink per remote region (bridge/regions.py).
    With ``layout``, no order is taken before the deployment manifest agrees.
    """

    def __init__(
        self,
        config: BridgeConfig,
        sink: OrderSink,
        metrics: BridgeMetrics,
        *,
        heartbeat: HeartbeatStore | None = None,
        region_sinks: Mapping[str, OrderSink] | None = None,
        layout: Callable[[], Awaitable[BridgeConfig]] | None = None,
    ) -> None:
        self.config = config
        # Agrees with the deployment manifest before the intake connects, and returns
        # the settings with the deployment's shard count (bridge/layout.py).
        self._layout = layout
        self.layout_agreed = layout is None
        self._heartbeat = heartbeat
        self.metrics = metrics
        self._sink = sink
        self._limits = TokenBuckets(config.rate_per_s, config.rate_burst)
        self._dlq_budget = DeadLetterBudget(config.dlq_device_per_min, config.dlq_device_burst)
        self.batcher = Batcher(
            sink,
            metrics,
            max_batch=config.batch_max,
            max_delay_s=config.batch_delay_ms / 1000,
            backoff_max_s=config.backoff_max_s,
            trim_every_batches=config.trim_every_batches,
            on_written=self._maybe_resume,
        )
        self._max_in_flight = config.receive_maximum
        self._intake: Intake | None = None
        self._stop = asyncio.Event()
        self._closing = False  # set once the background loops are told to end
        self._stopping = False
        self._paused = False
        self.started = False
        self.redis_state: RedisState | None = None  # the last inspection that worked
        self.redis_reachable = False
        self.redis_auth_ok = True
        self.redis_durable = False
        self._inspected = False
        self.regions: Regions | None = None
        if config.geo:
            self.regions = Regions(
                config,
                region_sinks or {},
                metrics,
                on_conflict=self.batcher.add,
                on_written=self._resume_if_drained,
            )
        metrics.in_flight.set_function(self._in_flight)
        metrics.ready.set_function(lambda: float(all(self.readiness().values())))

    def request_stop(self) -> None:
        """Begin a graceful stop (SIGTERM)."""
        self._stop.set()

    def take(self, topic: str, payload: bytes, ack: Ack, traceparent: str | None = None) -> None:
        """Take one message from the intake; ``ack`` is called once it may be acked."""
        self.metrics.received.inc()
        if self._stopping:
            return  # not acked: the broker redelivers it with the session
        received_at = now_ms()
        device_id: str | None
        try:
            device_id = device_id_from_orders_topic(topic)
        except SchemaError:
            device_id = None
        # Before any per-device state: a topic level is any size the broker lets through.
        if device_id is not None and not is_device_id(device_id):
            device_id = None
        if device_id is not None and not self._limits.allow(device_id):
            self.metrics.rejected.labels(Reason.RATE_LIMITED).inc()
            self.metrics.throttled.labels("orders").inc()
            limited = Outcome("rejected", Reason.RATE_LIMITED)
            self._receipt(device_id, order_id_hint(payload), limited)
            ack()
            return
        item = classify(
            topic, payload, shards=self.config.shards, received_at_ms=received_at, trace=traceparent
        )
        target: Batcher = self.batcher
        if self.regions is not None and isinstance(item, ValidOrder):
            routed = self.regions.route(item)
            if isinstance(routed, Outcome):
                # An authority this bridge does not know: nothing written; the device keeps
                # the order and resends it until the bridge is configured with that region.
                if device_id is not None:
                    self._receipt(device_id, item.order_id, routed)
                ack()
                return
            if routed is not None:
                target = routed  # another region's authority: its own writer
        if isinstance(item, DeadLetter):
            if not self._dlq_budget.allow(device_id):
                # Past the device's DLQ budget: a trace (counter, receipt), no Redis write.
                self.metrics.rejected.labels(item.reason).inc()
                self.metrics.dlq_shed.labels(item.reason).inc()
                if device_id is not None:
                    self._receipt(device_id, item.order_id, Outcome("rejected", item.reason))
                ack()
                return
            log.debug("dead letter", topic=topic, reason=item.reason, payload=truncate(payload))

        def done(outcome: Outcome) -> None:
            if device_id is not None:
                self._receipt(device_id, item.order_id, outcome)
            ack()

        target.add(item, done)
        if self._in_flight() >= self._max_in_flight and self._intake is not None:
            self._intake.pause_reading()
            self._paused = True

    def _maybe_resume(self) -> None:
        self.redis_reachable = True  # a batch was just written
        self._resume_if_drained()

    def _resume_if_drained(self) -> None:
        """Read again once in-flight work fell to half the limit (local or cross-region)."""
        # Resume at half the limit, so reads don't flap on every batch.
        if self._paused and self._in_flight() <= self._max_in_flight // 2:
            self._paused = False
            if self._intake is not None:
                self._intake.resume_reading()

    def _in_flight(self) -> int:
        """Messages taken and not yet answered, local and cross-region."""
        remote = self.regions.pending if self.regions is not None else 0
        return self.batcher.pending + remote

    def _receipt(self, device_id: str, order_id: str | None, outcome: Outcome) -> None:
        body = receipt_bytes(order_id, outcome.result, outcome.reason, now_ms())
        if self._intake is None:  # a message that came during the first handshake
            self.metrics.receipts_failed.inc()
            return
        try:
            self._intake.publish_receipt(device_id, body)
        except IntakeError as exc:  # receipts are advisory; agents resend
            self.metrics.receipts_failed.inc()
            log.debug("receipt not published", device_id=device_id, error=str(exc))

    def health(self) -> dict[str, bool]:
        """Checks for ``/healthz``."""
        return {
            "redis": self.batcher.redis_ok and self.redis_reachable,
            "mqtt": self._intake is not None and self._intake.connected,
        }

    def readiness(self) -> dict[str, bool]:
        """Checks for ``/readyz``: health, credentials, memory, durability, not stopping."""
        error = self.batcher.redis_error
        checks = {
            **self.health(),
            "redis_auth": self.redis_auth_ok and not isinstance(error, RedisAuthError),
            "redis_writable": not isinstance(error, RedisFullError)
            and not (self.redis_state is not None and self.redis_state.full),
            "accepting": not self._stopping,
            "layout": self.layout_agreed,
        }
        if self.config.redis_require_durable:
            checks["redis_durable"] = self.redis_durable
        return checks

    def heartbeat_report(self) -> dict[str, str | int]:
        """What each heartbeat says: readiness, durability, in-flight, the failing checks."""
        checks = self.readiness()
        return {
            "ready": int(all(checks.values())),
            "redis_durable": int(self.redis_durable),
            "in_flight": self._in_flight(),
            "failing": ",".join(name for name, ok in checks.items() if not ok),
        }

    def redis_details(self) -> dict[str, Any]:
        """What ``/readyz`` says about Redis (and other regions) beside the checks."""
        state = self.redis_state
        error = self.batcher.redis_error
        geo = self.regions.status() if self.regions is not None else {}
        return {
            **geo,
            "redis_durable": self.redis_durable,
            "redis": {
                "aof_enabled": state.aof_enabled if state else None,
                "appendfsync": state.appendfsync if state else None,
                "used_memory": state.used_memory if state else None,
                "maxmemory": state.maxmemory if state else None,
                "last_error": str(error) if error else None,
                "failures": self.batcher.failures,
            },
        }

    async def run(self, intake_factory: IntakeFactory | None = None) -> None:
        """Run until :meth:`request_stop`, then drain and return."""
        factory = intake_factory or self._default_intake
        cfg = self.config
        intake = factory(self.take)
        # The intake is known before it connects, and the batch writer runs
        # before the handshake: a session backlog that arrives during it is
        # written and acked, so the intake's Receive Maximum never stalls it.
        self._intake = intake
        async with HttpServer(
            cfg.http_host,
            cfg.http_port,
            self.metrics,
            health=self.health,
            ready=self.readiness,
            details=self.redis_details,
        ):
            await self._inspect_redis()
            # A loop that cannot go on fails the group (LoopFailed): never a silent half-life.
            async with asyncio.TaskGroup() as tasks:
                writer = tasks.create_task(
                    critical("batch-writer", self.batcher.run()), name="batch-writer"
                )
                probe = tasks.create_task(
                    critical("redis-probe", self._probe_redis()), name="redis-probe"
                )
                beat = None
                if self._heartbeat is not None and cfg.heartbeat_interval_s > 0:
                    beat = tasks.create_task(
                        run_heartbeat(self._heartbeat, cfg.client_id, self.heartbeat_report,
                                      cfg.heartbeat_interval_s, lambda: self._closing),
                        name="heartbeat",
                    )  # fmt: skip
                regions = None
                if self.regions is not None:
                    regions = tasks.create_task(
                        critical("region-writers", self.regions.run()), name="region-writers"
                    )
                refusal = await self._agree_layout()
                if refusal is None:
                    async with intake:
                        self.started = True
                        self.metrics.mqtt_up.set(1)
                        if all(self.readiness().values()):
                            log.info("bridge running", client_id=cfg.client_id,
                                     shards=self.config.shards,
                                     redis_durable=self.redis_durable)  # fmt: skip
                        else:
                            failing = [name for name, ok in self.readiness().items() if not ok]
                            log.error("bridge running but NOT READY", client_id=cfg.client_id,
                                      failing=failing)  # fmt: skip
                        await self._stop.wait()
                        await self._drain()
                self._closing = True
                self.batcher.close()
                writer.cancel()
                probe.cancel()
                if beat is not None:
                    beat.cancel()
                if self.regions is not None and regions is not None:
                    self.regions.close()
                    regions.cancel()
        self.metrics.mqtt_up.set(0)
        if refusal is not None:
            raise refusal
        log.info("bridge stopped", peak_pending=self.batcher.peak_pending)

    async def _agree_layout(self) -> LayoutError | None:
        """Agree with the deployment manifest (bridge/layout.py); the refusal, if any."""
        if self._layout is None:
            return None
        try:
            self.config = await self._layout()
        except LayoutError as exc:
            return exc
        self.layout_agreed = True
        return None

    async def _drain(self) -> None:
        self._stopping = True
        log.info("draining")
        try:
            async with asyncio.timeout(self.config.drain_grace_s):
                if self.regions is not None:
                    # First: a remote conflict still becomes a local dead letter.
                    await self.regions.drain()
                await self.batcher.drain()
        except TimeoutError:
            log.warning("drain grace expired; unwritten messages stay unacked for redelivery")
        await asyncio.sleep(0)  # the intake flushes the last PUBACKs on the next turn

    async def _probe_redis(self) -> None:
        """Keep the Redis checks honest while no batches flow, and time round trips.

        Stops on ``_closing`` as well as on cancel: Python 3.11 can lose a cancel
        that lands as a timeout inside redis-py fires, and shutdown then waited on
        this loop for ever (seen ~1 stop in 20 after a backlog drained).
        """
        while not self._closing:
            await asyncio.sleep(REDIS_PROBE_INTERVAL_S)
            if not self._closing:
                await self._inspect_redis()

    async def _inspect_redis(self) -> None:
        """One INFO round trip: reachable? credentials? durable? full? Never raises."""
        started = time.perf_counter()
        try:
            state = await self._sink.inspect()
        except StoreError as exc:
            self._redis_unreachable(exc)
            return
        except Exception as exc:  # a bug: report it, keep probing
            log.exception("redis inspection failed")
            self._redis_unreachable(StoreError(repr(exc)))
            return
        self.metrics.redis_rtt.observe(time.perf_counter() - started)
        if not self.redis_reachable or not self.redis_auth_ok:
            log.info("redis reachable", appendfsync=state.appendfsync, aof=state.aof_enabled)
        self.redis_reachable = True
        self.redis_auth_ok = True
        if self.batcher.redis_error is None:
            self.metrics.redis_up.set(1)
            self.metrics.redis_auth_ok.set(1)
        if state.full and not (self.redis_state is not None and self.redis_state.full):
            log.error("REDIS IS FULL (maxmemory)", used_memory=state.used_memory,
                      maxmemory=state.maxmemory)  # fmt: skip
        elif not state.full and self.redis_state is not None and self.redis_state.full:
            log.info("redis has memory again", used_memory=state.used_memory)
        self.metrics.redis_full.set(1 if state.full else 0)
        self.redis_state = state
        self._set_dlq_cap(state.maxmemory or 0)
        self._set_durable(state)

    def _set_dlq_cap(self, maxmemory: int) -> None:
        cfg = self.config
        cap = dlq_entries(cfg.dlq_max_bytes, maxmemory, cfg.dlq_maxlen)
        if isinstance(self._sink, RedisSink) and cap != self._sink.dlq_maxlen:
            log.info("dlq cap", entries=cap, maxmemory=maxmemory)
            self._sink.dlq_maxlen = cap
        self.metrics.dlq_maxlen.set(cap)

    def _set_durable(self, state: RedisState) -> None:
        durable = state.durable
        if durable is None:  # the ACL hides CONFIG GET (or INFO): only the operator knows
            durable = self.config.redis_assume_fsync_always
        self.metrics.redis_durable.set(-1 if state.durable is None else int(state.durable))
        if durable != self.redis_durable or not self._inspected:
            self._inspected = True
            if durable:
                log.info("redis is durable", aof=state.aof_enabled, appendfsync=state.appendfsync)
            else:
                log.error(
                    "REDIS IS NOT DURABLE: an accepted order can be lost on a power cut; "
                    "run Redis with redis/redis.conf (appendonly yes, appendfsync always)",
                    aof=state.aof_enabled,
                    appendfsync=state.appendfsync or "unknown (CONFIG GET not allowed)",
                )
        self.redis_durable = durable

    def _redis_unreachable(self, exc: StoreError) -> None:
        if isinstance(exc, RedisAuthError):
            if self.redis_auth_ok:
                log.error("REDIS REFUSED OUR CREDENTIALS: check the password in --redis-url",
                          error=str(exc))  # fmt: skip
            self.redis_auth_ok = False
            self.metrics.redis_auth_ok.set(0)
        elif self.redis_reachable:
            log.warning("redis unreachable", error=str(exc))
        self.redis_reachable = False
        self.metrics.redis_up.set(0)

    def _default_intake(self, sink: MessageSink) -> Intake:
        """One intake on the broker; with several brokers, one on each (bridge/brokers.py)."""
        urls = parse_mqtt_urls(self.config.mqtt_url)
        if len(urls) == 1:
            return self._intake_on(urls[0], sink)
        # Waits a little for each broker at start, then carries on: a dead broker
        # must not keep the bridge from the live ones.
        return BrokerSet(
            len(urls), sink, lambda i, s: self._intake_on(urls[i], s, connect_wait_s=5.0)
        )

    def _intake_on(
        self, url: MqttUrl, sink: MessageSink, connect_wait_s: float | None = None
    ) -> MqttIntake:
        cfg = self.config
        return MqttIntake(
            url,
            client_id=cfg.client_id,
            subscriptions=[
                PropertySubscription(
                    shared_orders_subscription(cfg.share_group), sink, TRACEPARENT_PROPERTY
                )
            ],
            session_expiry_s=cfg.session_expiry_s,
            receive_maximum=cfg.receive_maximum,
            max_packet_size=cfg.mqtt_max_packet_size,
            keepalive_s=cfg.mqtt_keepalive_s,
            backoff=Backoff(0.1, cfg.backoff_max_s),
            connect_wait_s=connect_wait_s,
            ca_file=cfg.mqtt_ca_file,
            metrics=self.metrics.mqtt,
            name="bridge-intake",
        )


def build_sink(config: BridgeConfig) -> RedisSink:
    """The Redis sink the configuration asks for (this region's, in geo mode)."""
    return RedisSink(
        config.local_redis_url,
        cluster=config.redis_cluster,
        dedup_ttl_s=config.dedup_ttl_s,
        dlq_maxlen=dlq_entries(config.dlq_max_bytes, 0, config.dlq_maxlen),
        timeout_s=config.redis_timeout_s,
        min_replicas=config.redis_min_replicas,
        replica_timeout_ms=config.redis_replica_timeout_ms,
        sentinels=config.redis_sentinel,
        sentinel_master=config.redis_sentinel_master,
    )
