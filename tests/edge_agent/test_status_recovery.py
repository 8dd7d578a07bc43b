"""Status recovery: a terminal status the broker lost is asked for again and arrives."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from edge_agent import AgentConfig, EdgeAgent
from testrig.servers import MosquittoProcess, port_is_open
from tests.helpers import wait_until

from .bridge_double import BridgeDouble
from .conftest import order_body


async def test_status_lost_in_a_broker_restart_is_recovered_by_query(
    device_id: str,
    make_config: Callable[..., AgentConfig],
    mosquitto_factory: Callable[..., MosquittoProcess],
) -> None:
    """Statuses queued for an offline agent die with a non-persistent broker; queries get them."""
    broker = mosquitto_factory(persistence=False)
    config = make_config(
        mqtt_url=broker.url,
        http_enabled=False,
        status_query_delay_s=0.4,
        status_query_max_interval_s=0.8,
    )
    ids = [f"recover-{i:04d}" for i in range(150)]  # more than one query's 100 ids
    with BridgeDouble(broker.url) as double:
        async with EdgeAgent(config) as agent:
            for order_id in ids:
                await agent.submit(order_body(order_id))

            async def all_accepted() -> bool:
                rows, _ = await agent.list_orders(state="accepted", limit=500)
                return len(rows) == len(ids)

            await wait_until(all_accepted, 30, "every order accepted")
        # The agent is off; its persistent session queues what the pipeline publishes...
        for order_id in ids:
            await asyncio.to_thread(double.publish_status, device_id, order_id, "fulfilled")
        # ...and a broker restart without persistence loses it, as in the field.
        await asyncio.to_thread(broker.kill)
        assert not port_is_open(broker.port)
        await asyncio.to_thread(broker.start)
        assert await asyncio.to_thread(double.subscribed.wait, 10)

        # On a loaded machine the first run may already have asked about some orders.
        earlier = len(double.queries)
        async with EdgeAgent(config) as agent:
            # An order the first run asked about late may come due after ids[0]'s second
            # query: wait for both instead of expecting one to imply the other.
            async def asked_all_and_again() -> bool:
                asked = double.queries[earlier:]
                twice = sum(ids[0] in q for q in asked) >= 2
                return twice and {oid for q in asked for oid in q} >= set(ids)

            await wait_until(asked_all_and_again, 20, "the agent asking about all, and again")
            rec = await agent.get(ids[0])
            assert rec is not None
            assert rec.status is None  # the queued status really was lost
            assert max(len(q) for q in double.queries) <= 100
            health = await agent.health()
            assert health.awaiting_status == len(ids)

            double.answer_queries = True  # the pipeline's responder is up

            async def all_fulfilled() -> bool:
                rows, _ = await agent.list_orders(state="fulfilled", limit=500)
                return len(rows) == len(ids)

            await wait_until(all_fulfilled, 20, "every terminal status recovered")
            assert (await agent.health()).awaiting_status == 0
            # A tick that read its due orders before the last status was committed still
            # publishes them. That read ran on the outbox's single writer thread before the
            # health read above, and the tick publishes as soon as it resumes, before the
            # test does: the agent's count is final now, whatever the load.
            published = _published_queries(agent)

            def delivered() -> bool:
                return len(double.queries) - earlier >= published

            await wait_until(delivered, 20, "the queries already on their way")
            asked = len(double.queries)
            await asyncio.sleep(1.5)  # several query intervals: a terminal status ends the asking
            assert _published_queries(agent) == published
            assert len(double.queries) == asked


async def test_queries_stop_at_the_dedup_horizon(
    make_config: Callable[..., AgentConfig], mqtt_url: str
) -> None:
    """An order whose status never comes is asked about until the horizon, then counted."""
    config = make_config(
        http_enabled=False,
        status_query_delay_s=0.2,
        status_query_max_interval_s=0.3,
        status_query_max_age_s=2.0,
    )
    with BridgeDouble(mqtt_url) as double:
        async with EdgeAgent(config) as agent:
            await agent.submit(order_body("horizon-0001"))

            async def given_up() -> bool:
                return (await agent.health()).status_never_heard == 1

            await wait_until(given_up, 20, "status queries given up")
            assert sum("horizon-0001" in q for q in double.queries) >= 2
            asked = len(double.queries)
            await asyncio.sleep(1.0)
            assert len(double.queries) == asked
            assert (await agent.health()).awaiting_status == 0


def _published_queries(agent: EdgeAgent) -> float:
    return float(agent.metrics.status_queries._value.get())  # prometheus has no public getter
