"""`order-pipeline --workers 2` as deployed: API + supervised worker processes, metrics, SIGTERM."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis

from pipeline.config import PipelineConfig
from testrig.servers import free_port
from testrig.services import pid_alive
from tests.helpers import make_order, wait_until

from .conftest import StatusListener
from .processes import env_for, spawn, spawn_script, stop_all
from .producer import produce


def log_events(log: Path, msg: str) -> list[dict[str, Any]]:
    """The JSON log lines with this ``msg`` (the service and its workers share the log)."""
    lines = log.read_text().splitlines() if log.exists() else []
    return [e for e in map(json.loads, lines) if e.get("msg") == msg]


def alive(pid: int) -> bool:
    """True while a process with this pid exists."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.usefixtures("catalog")
async def test_service_runs_workers_serves_api_restarts_dead_workers_and_stops_on_sigterm(
    aredis: aioredis.Redis, config: PipelineConfig, status_listener: StatusListener, tmp_path: Path
) -> None:
    """Orders reach `fulfilled` via 2 worker processes; a killed one is replaced; SIGTERM ends."""
    port = free_port()
    env = env_for(config, http_port=port, workers=2, gateway_latency_ms=5, log_level="info")
    log = tmp_path / "service.log"
    service = spawn(["--workers", "2"], env, log)
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as http:

            async def healthy() -> bool:
                try:
                    async with http.get(f"{base}/healthz") as response:
                        return response.status == 200
                except aiohttp.ClientConnectionError:
                    return False

            await wait_until(healthy, what="the API")

            def started_workers() -> list[int]:
                return [
                    int(e["consumer"].rsplit("-", 1)[1]) for e in log_events(log, "worker_started")
                ]

            async def workers_up(count: int) -> bool:
                return len(started_workers()) >= count

            await wait_until(lambda: workers_up(2), what="two worker processes")
            status_listener.subscribe("svc-dev")
            orders = [make_order("svc-dev", seq) for seq in range(20)]
            for order in orders[:10]:
                await produce(aredis, order, config.shards)

            async def fulfilled(batch: list = orders[:10]) -> bool:  # type: ignore[type-arg]
                for order in batch:
                    async with http.get(f"{base}/v1/orders/{order.order_id}") as response:
                        if (
                            response.status != 200
                            or (await response.json())["status"] != "fulfilled"
                        ):
                            return False
                return True

            await wait_until(fulfilled, what="orders fulfilled via the service")

            # A worker dies hard: the supervisor starts another, and work goes on.
            victim = started_workers()[0]
            os.kill(victim, signal.SIGKILL)
            await wait_until(lambda: asyncio.sleep(0, not alive(victim)), what="victim gone")
            await wait_until(lambda: workers_up(3), what="a replacement worker")
            assert log_events(log, "worker_process_died")[0]["rc"] == -signal.SIGKILL
            for order in orders[10:]:
                await produce(aredis, order, config.shards)
            await wait_until(lambda: fulfilled(orders), what="all orders fulfilled")

            async def counted() -> bool:
                # Counted by the worker processes (the dead one too), summed by the API process.
                async with http.get(f"{base}/metrics") as response:
                    metrics = await response.text()
                assert "pipeline_step_seconds_bucket" in metrics
                return 'pipeline_orders_processed_total{outcome="fulfilled"} 20.0' in metrics

            await wait_until(counted, what="20 fulfilled in /metrics")

        async def heard() -> bool:
            # At least once: the kill may cost a `confirmed` (published with the batch that
            # died) or repeat a `fulfilled` (re-published when the entry is reclaimed).
            heard = [status_listener.statuses(o.order_id) for o in orders]
            return all(
                h and h[-1] == "fulfilled" and set(h) <= {"confirmed", "fulfilled"} for h in heard
            )

        await wait_until(heard, what="statuses over the broker")
        workers = [p for p in started_workers() if alive(p)]
        assert len(workers) == 2
        service.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(service.wait, 30) == 0
        assert not any(alive(p) for p in workers)
    finally:
        stop_all([service])


async def test_workers_run_the_installed_pipeline_not_one_in_the_working_directory(
    aredis: aioredis.Redis, config: PipelineConfig, tmp_path: Path
) -> None:
    """Started from a folder holding another `pipeline/` (a source tree of another release),
    the supervisor's workers still import the installed one."""
    decoy = tmp_path / "pipeline"
    decoy.mkdir()
    marker = tmp_path / "decoy-ran"
    (decoy / "__init__.py").write_text("")
    (decoy / "cli.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    port = free_port()
    env = env_for(config, http_port=port, workers=1, log_level="info")
    log = tmp_path / "service.log"
    service = spawn_script(["run"], env, log, cwd=tmp_path)
    try:

        async def worker_started() -> bool:
            return bool(log_events(log, "worker_started"))

        await wait_until(worker_started, what="a worker")
        assert not marker.exists(), "a worker imported the pipeline/ of its working directory"
    finally:
        stop_all([service])
    # Its worker went with it: orphaned, it drained for a second on the shared Redis and
    # broker and took the next test's orders and status queries (test_status_query's flood).
    workers = [int(event["pid"]) for event in log_events(log, "worker_process_started")]
    assert workers
    assert not [pid for pid in workers if pid_alive(pid)], "a worker outlived stop_all"
