"""Status recovery: ask again for terminal statuses the broker may have lost.

A Status is published once, at QoS 1; a broker that restarts without
persistence loses the ones it had queued for an offline device, and nothing
would send them again. So an order receipted ``accepted``/``duplicate`` gets
a deadline (``status_query_delay_s`` of agent-clock time after the receipt,
stored in the outbox so it survives restarts). Past it, without a terminal
status (``fulfilled``, ``rejected``, ``failed``), the agent publishes a
``StatusQuery`` (contract addition, ≤ 100 ids each) on
``v1/devices/{id}/status-query``; the pipeline answers with an ordinary
Status. Unanswered, the order is asked about again with capped, jittered
backoff, until its terminal status comes or ``status_query_max_age_s`` (the
bridge's dedup horizon) has passed since its first send; then the agent
counts and logs it (``status_never_heard``) and the order becomes prunable.
"""

from __future__ import annotations

import asyncio
import random

import structlog

from schemas.messages import MAX_QUERIED_ORDERS
from servicekit.backoff import Backoff, full_jitter

from .config import AgentConfig
from .errors import StorageError
from .metrics import AgentMetrics
from .outbox import Outbox
from .publisher import Publisher

log = structlog.get_logger(__name__)

# Most StatusQuery messages per tick: a device back from a long outage asks
# for its backlog over several ticks instead of in one burst.
MAX_QUERIES_PER_TICK = 10


class StatusRecovery:
    """The loop that asks for overdue terminal statuses; run :meth:`run` as a task."""

    def __init__(
        self,
        config: AgentConfig,
        outbox: Outbox,
        publisher: Publisher,
        metrics: AgentMetrics,
        rng: random.Random | None = None,
    ) -> None:
        self._config = config
        self._outbox = outbox
        self._publisher = publisher
        self._metrics = metrics
        self._clock = outbox.clock
        self._rng = rng or random.Random()
        self.gave_up = 0

    def next_query_in_ms(self, queries: int) -> int:
        """Delay before query number ``queries + 1``: at least the base delay, then backoff."""
        base = self._config.status_query_delay_s
        cap = max(base, self._config.status_query_max_interval_s)
        return int((base + full_jitter(queries, base, cap - base, self._rng)) * 1000)

    async def run(self) -> None:
        """Now and then, query what is overdue; storage trouble backs off and retries."""
        cfg = self._config
        # A quarter of the delay is precise enough, and keeps thousands of simulated
        # agents in one process from reading their outboxes every second.
        interval_s = max(cfg.poll_interval_s, cfg.status_query_delay_s / 4)
        trouble = Backoff(interval_s, max(interval_s, cfg.storage_retry_s * 4))
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.tick()
            except StorageError as exc:
                log.warning("status_recovery_storage_error", reason=exc.reason, detail=exc.detail)
                await trouble.wait()
            else:
                trouble.reset()

    async def tick(self) -> int:
        """Publish the queries due now; return how many orders were asked about."""
        if not self._publisher.connected:
            return 0
        cfg = self._config
        now = self._clock.now_ms()
        horizon = now - int(cfg.status_query_max_age_s * 1000)
        due, gave_up = await self._outbox.status_queries_due(
            now, MAX_QUERIED_ORDERS * MAX_QUERIES_PER_TICK, horizon
        )
        if gave_up:
            self.gave_up += gave_up
            self._metrics.status_queries_given_up.inc(gave_up)
            log.error("status_never_heard", count=gave_up, max_age_s=cfg.status_query_max_age_s)
        asked = 0
        for start in range(0, len(due), MAX_QUERIED_ORDERS):
            chunk = due[start : start + MAX_QUERIED_ORDERS]
            ids = tuple(order_id for order_id, _ in chunk)
            if not self._publisher.publish_status_query(ids):
                break
            next_at = tuple(now + self.next_query_in_ms(queries) for _, queries in chunk)
            self._outbox.status_queried(ids, next_at)
            asked += len(ids)
        if asked:
            log.info("status_queried", orders=asked)
        return asked
