"""Real edge agents offering orders while a runbook runs, and the count at the end.

Each agent is a real :class:`edge_agent.EdgeAgent` with an in-memory outbox.
The load submits orders round robin over the agents that are not retired, at
a steady rate, until :meth:`Load.stop`; :meth:`Load.settle` then waits until
every outbox is empty and checks every order against Redis with the fleet
verifier: in the streams exactly once and in a terminal pipeline status.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from types import TracebackType
from typing import Self

import redis.asyncio as aioredis

from edge_agent import AgentConfig, AgentError, EdgeAgent
from fleet.statuses import order_statuses
from fleet.verify import OrderRef, Verdict, verify
from tests.edge_agent.conftest import order_body

SETTLE_POLL_S = 0.2


class Load:
    """Agents and the orders they took; ``async with`` starts them and stops them."""

    def __init__(self, configs: list[AgentConfig], rate_per_s: float) -> None:
        self.rate_per_s = rate_per_s
        self.agents: dict[str, EdgeAgent] = {}
        self.orders: list[OrderRef] = []
        self.refused = 0
        self._configs = configs
        self._retired: set[str] = set()
        self._offering: asyncio.Task[None] | None = None
        self._seq = itertools.count()

    async def __aenter__(self) -> Self:
        try:
            for config in self._configs:
                await self.add(config)
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def add(self, config: AgentConfig) -> EdgeAgent:
        """Start an agent (a device put in service) and offer it orders from now on."""
        agent = EdgeAgent(config, inline_storage=config.db == ":memory:")
        await agent.__aenter__()
        self.agents[config.device_id] = agent
        return agent

    def start(self) -> None:
        """Begin offering orders."""
        self._offering = asyncio.create_task(self._offer(), name="runbook-load")

    async def stop(self) -> None:
        """Stop offering orders (the outboxes still drain)."""
        if self._offering is not None:
            self._offering.cancel()
            await asyncio.gather(self._offering, return_exceptions=True)
            self._offering = None

    async def remove(self, device_id: str) -> EdgeAgent:
        """Stop ``device_id``'s agent (its orders stay counted); return it."""
        self._retired.add(device_id)
        agent = self.agents.pop(device_id)
        await agent.__aexit__(None, None, None)
        return agent

    def retire(self, device_id: str) -> None:
        """Offer ``device_id`` no more orders (it is about to be revoked)."""
        self._retired.add(device_id)

    def connects(self, device_id: str, metric: str = "edge_mqtt_connects_total") -> float:
        """How many times ``device_id``'s agent has connected to the broker (or ``metric``)."""
        registry = self.agents[device_id].metrics.registry
        return registry.get_sample_value(metric) or 0.0

    def connected(self) -> int:
        """Agents with a live broker connection."""
        return sum(1 for a in self.agents.values() if a.publisher.connected)

    def pending(self, device_ids: set[str] | None = None) -> int:
        """Orders not yet receipted, over ``device_ids`` (default: every agent)."""
        return sum(
            agent.outbox.store.pending_rows
            for device_id, agent in self.agents.items()
            if device_ids is None or device_id in device_ids
        )

    async def drained(self, device_ids: set[str], timeout_s: float) -> bool:
        """Wait until these agents' outboxes hold nothing unreceipted."""
        deadline = time.monotonic() + timeout_s
        while self.pending(device_ids) and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(SETTLE_POLL_S)
        return not self.pending(device_ids)

    async def _offer(self) -> None:
        interval_s = 1 / self.rate_per_s
        next_at = time.monotonic()
        for n in self._seq:
            live = [d for d in self.agents if d not in self._retired]
            device_id = live[n % len(live)]
            try:
                submitted = await self.agents[device_id].submit(order_body())
            except AgentError:
                self.refused += 1
            else:
                self.orders.append((device_id, submitted.order_id))
            next_at += interval_s
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))

    async def settle(self, redis_url: str, *, shards: int, timeout_s: float = 60.0) -> Verdict:
        """Stop offering, wait for every outbox to drain and every order to end; the verdict."""
        await self.stop()
        await self.drained(set(self.agents), timeout_s)
        deadline = time.monotonic() + timeout_s
        client = aioredis.from_url(redis_url)
        try:
            while True:
                verdict = await verify(
                    client, self.orders, shards=shards,
                    statuses=lambda refs: order_statuses(client, refs, shards),
                    pipeline_writes=True,
                )  # fmt: skip
                if verdict.ok or time.monotonic() > deadline:
                    return verdict
                await asyncio.sleep(SETTLE_POLL_S)
        finally:
            await client.aclose()

    async def close(self) -> None:
        """Stop offering and stop every agent."""
        await self.stop()
        agents, self.agents = self.agents, {}
        await asyncio.gather(
            *(a.__aexit__(None, None, None) for a in agents.values()), return_exceptions=True
        )
