"""The bridge: wire intake, validation, batcher, receipts and the ops endpoints together.

Per message: rate limit → validate → batch → Redis (order or dead letter) →
receipt → ack (the intake's PUBACK). Nothing is acked before Redis holds it;
on SIGTERM the bridge stops taking messages (leaves them unacked), writes what
it holds, acks that, and leaves the rest to the broker's session.
"""

from __future__ import annotations

import asyncio

import structlog

from schemas import Reason, SchemaError
from schemas.names import device_id_from_orders_topic, is_device_id, receipts_topic
from servicekit.clock import now_ms
from servicekit.logs import truncate
from servicekit.tokens import TokenBuckets
from servicekit.urls import MqttUrl

from .batcher import Batcher, Outcome
from .config import BridgeConfig
from .errors import IntakeError
from .http import HttpServer
from .ingest import DeadLetter, classify, order_id_hint
from .intake import Ack, Intake, IntakeFactory, MessageSink
from .intake_gmqtt import GmqttIntake
from .intake_mqtt5 import Mqtt5Intake
from .metrics import BridgeMetrics
from .receipts import receipt_bytes
from .store import OrderSink, RedisSink

log = structlog.get_logger(__name__)

REDIS_PROBE_INTERVAL_S = 1.0


class Bridge:
    """One bridge replica: ``Bridge(config, sink, metrics)``, then ``await run()``."""

    def __init__(self, config: BridgeConfig, sink: OrderSink, metrics: BridgeMetrics) -> None:
        self.config = config
        self.metrics = metrics
        self._sink = sink
        self._limits = TokenBuckets(config.rate_per_s, config.rate_burst)
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
        self._stopping = False
        self._paused = False
        self.started = False
        metrics.in_flight.set_function(lambda: self.batcher.pending)

    def request_stop(self) -> None:
        """Begin a graceful stop (SIGTERM)."""
        self._stop.set()

    def take(self, topic: str, payload: bytes, ack: Ack) -> None:
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
            limited = Outcome("rejected", Reason.RATE_LIMITED)
            self._receipt(device_id, order_id_hint(payload), limited)
            ack()
            return
        item = classify(topic, payload, shards=self.config.shards, received_at_ms=received_at)
        if isinstance(item, DeadLetter):
            log.debug("dead letter", topic=topic, reason=item.reason, payload=truncate(payload))

        def done(outcome: Outcome) -> None:
            if device_id is not None:
                self._receipt(device_id, item.order_id, outcome)
            ack()

        self.batcher.add(item, done)
        if self.batcher.pending >= self._max_in_flight and self._intake is not None:
            self._intake.pause_reading()
            self._paused = True

    def _maybe_resume(self) -> None:
        # Resume at half the limit, so reads don't flap on every batch.
        if self._paused and self.batcher.pending <= self._max_in_flight // 2:
            self._paused = False
            if self._intake is not None:
                self._intake.resume_reading()

    def _receipt(self, device_id: str, order_id: str | None, outcome: Outcome) -> None:
        body = receipt_bytes(order_id, outcome.result, outcome.reason, now_ms())
        if self._intake is None:  # a message that came during the first handshake
            self.metrics.receipts_failed.inc()
            return
        try:
            self._intake.publish(receipts_topic(device_id), body)
        except IntakeError as exc:  # receipts are advisory; agents resend
            self.metrics.receipts_failed.inc()
            log.debug("receipt not published", device_id=device_id, error=str(exc))

    def health(self) -> dict[str, bool]:
        """Checks for ``/healthz``."""
        return {
            "redis": self.batcher.redis_ok,
            "mqtt": self._intake is not None and self._intake.connected,
        }

    def readiness(self) -> dict[str, bool]:
        """Checks for ``/readyz``."""
        return {**self.health(), "accepting": not self._stopping}

    async def run(self, intake_factory: IntakeFactory | None = None) -> None:
        """Run until :meth:`request_stop`, then drain and return."""
        factory = intake_factory or self._default_intake
        cfg = self.config
        async with (
            HttpServer(
                cfg.http_host, cfg.http_port, self.metrics, health=self.health, ready=self.readiness
            ),
            factory(self.take) as intake,
        ):
            self._intake = intake
            self.started = True
            self.metrics.mqtt_up.set(1)
            async with asyncio.TaskGroup() as tasks:
                writer = tasks.create_task(self.batcher.run(), name="batch-writer")
                probe = tasks.create_task(self._probe_redis(), name="redis-probe")
                log.info("bridge running", client_id=cfg.client_id, shards=cfg.shards)
                await self._stop.wait()
                await self._drain()
                writer.cancel()
                probe.cancel()
        self.metrics.mqtt_up.set(0)
        log.info("bridge stopped", peak_pending=self.batcher.peak_pending)

    async def _drain(self) -> None:
        self._stopping = True
        log.info("draining")
        try:
            async with asyncio.timeout(self.config.drain_grace_s):
                await self.batcher.drain()
        except TimeoutError:
            log.warning("drain grace expired; unwritten messages stay unacked for redelivery")
        await asyncio.sleep(0)  # the intake flushes the last PUBACKs on the next turn

    async def _probe_redis(self) -> None:
        """Keep ``redis_ok`` honest while no batches flow, and time round trips."""
        while True:
            await asyncio.sleep(REDIS_PROBE_INTERVAL_S)
            try:
                rtt = await self._sink.ping()
            except Exception as exc:  # StoreError or worse: report, don't die
                self.batcher.redis_ok = False
                self.metrics.redis_up.set(0)
                log.debug("redis probe failed", error=repr(exc))
            else:
                self.batcher.redis_ok = True
                self.metrics.redis_up.set(1)
                self.metrics.redis_rtt.observe(rtt)

    def _default_intake(self, sink: MessageSink) -> GmqttIntake | Mqtt5Intake:
        cfg = self.config
        url = MqttUrl.parse(cfg.mqtt_url)
        if cfg.mqtt_client == "gmqtt":
            return GmqttIntake(
                url,
                sink,
                client_id=cfg.client_id,
                share_group=cfg.share_group,
                session_expiry_s=cfg.session_expiry_s,
                receive_maximum=cfg.receive_maximum,
                backoff_max_s=cfg.backoff_max_s,
                ca_file=cfg.mqtt_ca_file,
            )
        return Mqtt5Intake(
            url,
            sink,
            client_id=cfg.client_id,
            share_group=cfg.share_group,
            session_expiry_s=cfg.session_expiry_s,
            receive_maximum=cfg.receive_maximum,
            keepalive_s=cfg.mqtt_keepalive_s,
            backoff_max_s=cfg.backoff_max_s,
            ca_file=cfg.mqtt_ca_file,
        )


def build_sink(config: BridgeConfig) -> RedisSink:
    """The Redis sink the configuration asks for."""
    return RedisSink(
        config.redis_url,
        cluster=config.redis_cluster,
        dedup_ttl_s=config.dedup_ttl_s,
        dlq_maxlen=config.dlq_maxlen,
        timeout_s=config.redis_timeout_s,
    )
