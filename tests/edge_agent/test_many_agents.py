"""Many agents in one process, as the fleet simulator runs them: no thread per agent."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import uuid

from edge_agent import AgentConfig, EdgeAgent

from .bridge_double import BridgeDouble
from .conftest import order_body

AGENTS = 100


async def test_hundred_in_memory_agents_share_threads(mqtt_url: str, bridge: BridgeDouble) -> None:
    """100 agents with in-memory outboxes run in one loop; all orders settle; threads stay few."""
    run = uuid.uuid4().hex[:8]
    configs = [
        AgentConfig(
            device_id=f"sim-{run}-{i:04d}",
            mqtt_url=mqtt_url,
            db=":memory:",
            http_enabled=False,
            reconnect_min_s=0.05,
            poll_interval_s=0.2,
        )
        for i in range(AGENTS)
    ]
    threads_before = threading.active_count()
    async with contextlib.AsyncExitStack() as stack:
        agents = [
            await stack.enter_async_context(EdgeAgent(c, inline_storage=True)) for c in configs
        ]
        ids = set()
        for agent in agents:
            for k in range(2):
                order_id = f"{agent.config.device_id}-o{k}"
                await agent.submit(order_body(order_id))
                ids.add(order_id)
        missing = await asyncio.to_thread(bridge.wait_for, ids, 60)
        assert not missing

        async def all_settled() -> bool:
            depths = [(await agent.health()).outbox_depth for agent in agents]
            return sum(depths) == 0

        deadline = asyncio.get_running_loop().time() + 30
        while not await all_settled():
            assert asyncio.get_running_loop().time() < deadline, "orders left unsettled"
            await asyncio.sleep(0.1)
        # The default executor (TCP connects) and the bridge double add a handful, not 100.
        assert threading.active_count() - threads_before < 20
