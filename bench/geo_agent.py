"""What geo mode costs the agent, and how fast it moves (not a test).

Two real Mosquitto brokers (regions ``home`` and ``b``), each with the
agent tests' bridge double (accepts everything). Prints, in the same run:

* drain rate of a backlog, single-region agent vs geo agent (the geo agent
  commits each order's ``attempts`` before its first PUBLISH and re-encodes
  the order with them);
* failover: home's broker SIGKILLed, time until an order submitted right then
  is receipted in ``b``; and home's bridge silent (broker up), time until an
  order is receipted in ``b`` (both with ``failover_after_s = 1``);
* failback: home's broker restarted, time until the agent is back home
  (``failback_probe_s = 0.5``).

    .venv/bin/python -m bench.geo_agent [--orders 3000] [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import structlog

from edge_agent import AgentConfig, EdgeAgent
from testrig.servers import MosquittoProcess
from tests.edge_agent.bridge_double import accept_all
from tests.edge_agent.geo_rig import RegionBridge, never_answer


def body(order_id: str) -> dict[str, Any]:
    return {
        "order_id": order_id,
        "currency": "EUR",
        "items": [{"sku": "cola-330", "qty": 2, "unit_price": 150}],
        "total": 300,
    }


async def until(predicate: Callable[[], Awaitable[bool]], timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await predicate():
        if time.monotonic() > deadline:
            raise TimeoutError
        await asyncio.sleep(0.01)


def config(tmp: Path, name: str, **kwargs: Any) -> AgentConfig:
    return AgentConfig(
        device_id=f"bench-{name}-{time.monotonic_ns()}",
        db=str(tmp / f"{name}-{time.monotonic_ns()}.db"),
        http_enabled=False,
        receipt_timeout_s=5.0,
        reconnect_min_s=0.05,
        reconnect_max_s=0.5,
        drain_rate_per_min=10_000_000.0,
        **kwargs,
    )


async def accepted(agent: EdgeAgent, order_id: str) -> bool:
    record = await agent.get(order_id)
    return record is not None and record.state == "accepted"


async def drain(cfg: AgentConfig, orders: int) -> float:
    """Orders/s from the moment the backlog is committed to the last receipt."""
    async with EdgeAgent(cfg) as agent:
        await until(lambda: _connected(agent))
        await asyncio.gather(*(agent.submit(body(f"drain-{i:06d}")) for i in range(orders)))
        start = time.perf_counter()

        async def done() -> bool:
            return agent.outbox.store.pending_rows == 0

        await until(done, 120)
        return orders / (time.perf_counter() - start)


async def _connected(agent: EdgeAgent) -> bool:
    return agent.publisher.connected


async def failover_after_kill(tmp: Path, home: MosquittoProcess, other: MosquittoProcess) -> float:
    cfg = config(
        tmp,
        "kill",
        region=(f"home={home.url}", f"b={other.url}"),
        failover_after_s=1.0,
        failback_probe_s=60.0,
    )
    async with EdgeAgent(cfg) as agent:
        await until(lambda: _connected(agent))
        await asyncio.to_thread(home.kill)
        start = time.perf_counter()
        await agent.submit(body("kill-000001"))
        await until(lambda: accepted(agent, "kill-000001"))
        took = time.perf_counter() - start
    await asyncio.to_thread(home.start)
    return took


async def failover_after_silence(tmp: Path, other: MosquittoProcess) -> float:
    quiet = MosquittoProcess(tmp / f"quiet-{time.monotonic_ns()}")
    quiet.start()
    try:
        with RegionBridge("home", quiet.url, never_answer):
            cfg = config(
                tmp,
                "silent",
                region=(f"home={quiet.url}", f"b={other.url}"),
                failover_after_s=1.0,
                failback_probe_s=60.0,
            )
            async with EdgeAgent(cfg) as agent:
                await until(lambda: _connected(agent))
                start = time.perf_counter()
                await agent.submit(body("silent-000001"))
                await until(lambda: accepted(agent, "silent-000001"))
                return time.perf_counter() - start
    finally:
        quiet.kill()


async def failback(tmp: Path, home: MosquittoProcess, other: MosquittoProcess) -> float:
    cfg = config(
        tmp,
        "back",
        region=(f"home={home.url}", f"b={other.url}"),
        failover_after_s=1.0,
        failback_probe_s=0.5,
    )
    async with EdgeAgent(cfg) as agent:
        await until(lambda: _connected(agent))
        await asyncio.to_thread(home.kill)

        async def in_b() -> bool:
            return agent.publisher.region == "b" and agent.publisher.connected

        await until(in_b)
        await asyncio.to_thread(home.start)
        start = time.perf_counter()

        async def at_home() -> bool:
            return agent.publisher.region == "home" and agent.publisher.connected

        await until(at_home)
        return time.perf_counter() - start


def spread(values: list[float], unit: str, fmt: str = ".2f") -> str:
    return (
        f"median {statistics.median(values):{fmt}} {unit} "
        f"(min {min(values):{fmt}}, max {max(values):{fmt}}, n={len(values)})"
    )


async def main(orders: int, runs: int) -> None:
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        home = MosquittoProcess(tmp / "home")
        other = MosquittoProcess(tmp / "b")
        home.start()
        other.start()
        try:
            with (
                RegionBridge("home", home.url, accept_all),
                RegionBridge("b", other.url, accept_all),
            ):
                single, geo = [], []
                for _ in range(runs):  # alternate, so machine noise hits both alike
                    single.append(await drain(config(tmp, "single", mqtt_url=home.url), orders))
                    geo_cfg = config(tmp, "geo", region=(f"home={home.url}", f"b={other.url}"))
                    geo.append(await drain(geo_cfg, orders))
                print(f"drain {orders} orders, single-region: {spread(single, 'orders/s', '.0f')}")
                print(f"drain {orders} orders, geo (2 regions): {spread(geo, 'orders/s', '.0f')}")
                print(f"  geo / single: {statistics.median(geo) / statistics.median(single):.2f}")
                kills = [await failover_after_kill(tmp, home, other) for _ in range(runs)]
                print(f"failover, home broker killed (failover_after_s=1): {spread(kills, 's')}")
                silent = [await failover_after_silence(tmp, other) for _ in range(runs)]
                print(f"failover, home bridge silent (failover_after_s=1): {spread(silent, 's')}")
                backs = [await failback(tmp, home, other) for _ in range(runs)]
                print(f"failback after home restarts (failback_probe_s=0.5): {spread(backs, 's')}")
        finally:
            home.kill()
            other.kill()


if __name__ == "__main__":
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--orders", type=int, default=3000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    asyncio.run(main(args.orders, args.runs))
