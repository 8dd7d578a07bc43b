"""Running the pipeline: one worker process, and the supervisor (API + K worker processes).

``order-pipeline`` (the supervisor) serves the orders API on ``--http-port``
and starts ``--workers`` worker processes (``order-pipeline worker``), handing
them its merged settings as ``ORDERS_*`` variables. A worker that dies is
started again after a pause; on SIGTERM the supervisor passes SIGTERM on,
waits for the workers to finish their batches, then stops the API.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Mapping
from typing import Any

import msgspec
import structlog
from aiohttp import web

from schemas.names import shared_health_subscription, shared_status_query_subscription
from servicekit.backoff import Backoff
from servicekit.config import ENV_PREFIX
from servicekit.layout import Manifest
from servicekit.loops import critical
from servicekit.mqtt import MqttMetrics
from servicekit.problems import ProblemAppRunner
from servicekit.redis_clients import connect
from servicekit.urls import parse_mqtt_urls

from ._calls import AnyRedis
from ._lua import Scripts
from .api import create_app
from .api_tokens import load_api_tokens
from .brokers import StatusFanout
from .config import PipelineConfig
from .health import HealthConsumer, HealthMetrics
from .layout import agree_layout, watch_layout
from .metrics import MULTIPROC_ENV, WorkerMetrics
from .regions import REGION_LOOKUP, RegionLookup, parse_region_apis
from .status import MqttStatusPublisher, StatusMetrics, status_client
from .status_query import StatusQueryMetrics, StatusQueryResponder
from .steps import StepDeps, build_chain
from .worker import Worker, default_consumer_name

log = structlog.get_logger(__name__)
RESTART_DELAY_S = 1.0  # first restart within this; doubling (capped) while a worker crash-loops
RESTART_DELAY_MAX_S = 30.0
HEALTHY_RUN_S = 10.0  # a worker that lived this long resets the restart back-off
SUPERVISOR_PID_ENV = "PIPELINE_SUPERVISOR_PID"
ORPHAN_CHECK_S = 1.0


def redis_client(config: PipelineConfig, **options: Any) -> AnyRedis:
    """A client without redis-py's own retries (the worker backs off itself).

    A Redis Cluster client with ``redis_cluster``. The socket timeout outlasts
    the XREADGROUP block. ``options`` go to the client (``max_connections``).
    """
    return connect(
        config.redis_url,
        timeout_s=max(5.0, config.block_ms / 1000 + 5.0),
        cluster=config.redis_cluster,
        sentinels=config.redis_sentinel,
        sentinel_master=config.redis_sentinel_master,
        **options,
    )


def worker_redis_client(config: PipelineConfig) -> AnyRedis:
    """The worker's own client: on one master (plain or Sentinel), a single connection.

    A batch's read, state writes and XACK must reach the same node. Pooled
    connections need not: across a Sentinel failover, a connection that waited
    on a frozen master gets its answer once that master resumes (still a master
    for a few seconds) and goes back to the pool beside connections to the new
    one. A commit there and its XACK on the new master left the entry acked
    where its outcome never was: processed for the device, gone for the new
    master (make demo-ha, 11 orders in 2 of 7 runs). On one connection a stale
    master gets the whole batch, whose writes die with its demotion, and the
    entry stays pending on the new master until it is reclaimed. A Cluster
    routes each key to its slot's node, so it keeps its pool.
    """
    if config.redis_cluster:
        return redis_client(config)
    return redis_client(config, max_connections=1)


def install_stop_signals(stop: asyncio.Event) -> None:
    """SIGTERM and SIGINT set ``stop``."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)


async def run_worker(
    config: PipelineConfig, stop: asyncio.Event, *, shards_given: bool = True
) -> None:
    """One worker until ``stop``; after the grace period a batch still running is cancelled.

    It first agrees with the deployment manifest (:mod:`pipeline.layout`), and
    stops (LoopFailed) if the manifest changes under it.
    """
    consumer = config.consumer or default_consumer_name()
    config = msgspec.structs.replace(config, consumer=consumer)
    client = redis_client(config)
    scripts = Scripts()
    metrics = WorkerMetrics(None)
    # From the start: a worker orphaned while it waits for Redis must not wait for ever.
    orphan_watch = asyncio.create_task(_watch_supervisor(stop), name="watch-supervisor")
    try:
        agreed = await _agree_unless_stopped(client, config, stop, shards_given=shards_given)
        if agreed is None:
            return
        config, manifest = agreed
        # One client per broker of the region (pipeline/brokers.py): statuses go to
        # every broker; a status query is answered on the broker it came from.
        mqtt_metrics = MqttMetrics("pipeline")
        clients = [
            status_client(config, f"pipeline-{consumer}", metrics=mqtt_metrics, url=url)
            for url in parse_mqtt_urls(config.mqtt_url)
        ]
        status_metrics = StatusMetrics()
        publisher = MqttStatusPublisher(
            clients[0] if len(clients) == 1 else StatusFanout(clients),
            ack_timeout_s=config.status_ack_timeout_s,
            backlog_max=config.status_backlog_max,
            metrics=status_metrics,
        )
        health = HealthConsumer(
            client, HealthMetrics(), ttl_s=config.health_ttl_s,
            device_per_min=config.health_device_per_min,
            clock_tolerance_s=config.health_clock_tolerance_s,
        )  # fmt: skip
        query_metrics = StatusQueryMetrics()
        responders = []
        for mqtt in clients:
            answers = publisher if len(clients) == 1 else MqttStatusPublisher(
                mqtt, ack_timeout_s=config.status_ack_timeout_s,
                backlog_max=config.status_backlog_max, metrics=status_metrics,
            )  # fmt: skip
            responder = StatusQueryResponder(
                client, answers, query_metrics, shards=config.shards,
                device_per_min=config.status_query_device_per_min,
            )  # fmt: skip
            mqtt.subscribe(shared_status_query_subscription(), responder.take)
            mqtt.subscribe(shared_health_subscription(), health.take)
            responders.append(responder)
        async with contextlib.AsyncExitStack() as connected:
            for mqtt in clients:
                await connected.enter_async_context(mqtt)
            own = worker_redis_client(config)
            connected.push_async_callback(own.aclose)
            chain = build_chain(config.steps, StepDeps(own, scripts, config))
            worker = Worker(own, publisher, chain, config, metrics, scripts=scripts)
            # One TaskGroup owns the loops; a loop that cannot go on raises LoopFailed
            # (logged with its name), the group cancels the rest, the process exits 1.
            async with asyncio.TaskGroup() as tasks:
                work = tasks.create_task(critical("worker", worker.run(stop)), name="worker")
                forever = [
                    *(
                        tasks.create_task(
                            critical("status-query-responder", responder.run()),
                            name="status-query-responder",
                        )
                        for responder in responders
                    ),
                    tasks.create_task(
                        critical("health-consumer", health.run()), name="health-consumer"
                    ),
                    tasks.create_task(
                        critical("layout-watch", watch_layout(client, manifest)),
                        name="layout-watch",
                    ),
                ]
                tasks.create_task(
                    _cancel_after_grace(stop, work, config.shutdown_grace_s), name="grace"
                )
                await asyncio.wait({work})
                for task in forever:
                    task.cancel()
    finally:
        orphan_watch.cancel()
        await client.aclose()


async def _agree_unless_stopped(
    client: AnyRedis, config: PipelineConfig, stop: asyncio.Event, *, shards_given: bool
) -> tuple[PipelineConfig, Manifest] | None:
    """:func:`agree_layout` (which waits out an unreachable Redis), or None once ``stop`` is
    set first: SIGTERM (or a gone supervisor) ends a service still waiting for Redis."""
    agreeing = asyncio.ensure_future(agree_layout(client, config, shards_given=shards_given))
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({agreeing, stopping}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
        agreeing.cancel()  # no-op once it is done
    if agreeing.done() and not agreeing.cancelled():
        return agreeing.result()  # a refusal (LayoutError) is raised, never dropped
    log.info("stopped_before_start", waited_for="the deployment manifest in Redis")
    return None


async def _cancel_after_grace(
    stop: asyncio.Event, work: asyncio.Task[None], grace_s: float
) -> None:
    """After ``stop``, give the worker ``grace_s`` to finish its batch, then cancel it."""
    await stop.wait()
    # The worker notices `stop` after its batch in hand (or the read's block).
    done, _ = await asyncio.wait({work}, timeout=grace_s)
    if not done:
        log.warning("shutdown_grace_exceeded", grace_s=grace_s)
        work.cancel()


async def _watch_supervisor(stop: asyncio.Event) -> None:
    """Drain and exit when the supervisor that started us is gone (we were re-parented)."""
    supervisor = os.environ.get(SUPERVISOR_PID_ENV)
    if not supervisor:
        return
    while not stop.is_set():
        if os.getppid() != int(supervisor):
            log.warning("supervisor_gone", supervisor_pid=supervisor)
            stop.set()
            return
        await asyncio.sleep(ORPHAN_CHECK_S)


def worker_env(
    config: PipelineConfig, base: Mapping[str, str], multiproc_dir: str
) -> dict[str, str]:
    """The environment of a worker process: every setting as ``ORDERS_*``."""
    env = {k: v for k, v in base.items() if not k.startswith(ENV_PREFIX)}
    for name, value in msgspec.structs.asdict(config).items():
        if name in {"consumer", "workers"}:
            continue
        if isinstance(value, tuple):  # a repeatable setting: comma-separated (servicekit.config)
            env[f"{ENV_PREFIX}{name.upper()}"] = ",".join(value)
            continue
        env[f"{ENV_PREFIX}{name.upper()}"] = (
            str(value).lower() if isinstance(value, bool) else str(value)
        )
    env[MULTIPROC_ENV] = multiproc_dir
    env[SUPERVISOR_PID_ENV] = str(os.getpid())
    return env


async def _supervise_one(index: int, env: dict[str, str], stop: asyncio.Event) -> None:
    backoff = Backoff(RESTART_DELAY_S, RESTART_DELAY_MAX_S)
    while not stop.is_set():
        started = time.monotonic()
        process = await asyncio.create_subprocess_exec(
            # -P: not the working directory first on sys.path, or a `pipeline/` folder there
            # (a source tree of another release) would be the workers' code.
            sys.executable,
            "-P",
            "-m",
            "pipeline.cli",
            "worker",
            env=env,
        )
        log.info("worker_process_started", index=index, pid=process.pid)
        wait = asyncio.create_task(process.wait(), name=f"wait-worker-{index}")
        stopping = asyncio.create_task(stop.wait(), name=f"stop-worker-{index}")
        await asyncio.wait({wait, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if stop.is_set():
            stopping.cancel()
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
            await wait
            log.info("worker_process_stopped", index=index, pid=process.pid, rc=process.returncode)
            return
        stopping.cancel()
        if time.monotonic() - started >= HEALTHY_RUN_S:
            backoff.reset()
        delay_s = backoff.next_delay()
        log.error("worker_process_died", index=index, pid=process.pid, rc=process.returncode,
                  restart_in_s=round(delay_s, 3))  # fmt: skip
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay_s):
                await stop.wait()


async def run_service(
    config: PipelineConfig, stop: asyncio.Event, *, shards_given: bool = True
) -> None:
    """The API plus ``config.workers`` supervised worker processes, until ``stop``.

    The workers get the deployment's shard count (agreed here, :mod:`pipeline.layout`).
    """
    client = redis_client(config)
    multiproc_dir = tempfile.mkdtemp(prefix="order-pipeline-metrics-")
    runner: web.AppRunner | None = None
    stack = contextlib.AsyncExitStack()  # geo mode's region lookup session
    try:
        agreed = await _agree_unless_stopped(client, config, stop, shards_given=shards_given)
        if agreed is None:
            return
        config, manifest = agreed
        # Fail fast on a bad step list rather than restart crashing workers forever.
        build_chain(config.steps, StepDeps(client, Scripts(), config))
        app = create_app(
            client,
            shards=config.shards,
            multiproc_dir=multiproc_dir if config.workers else None,
            tokens=load_api_tokens(config),
            health_stale_s=config.health_stale_s,
        )
        if config.region:
            lookup = RegionLookup(
                config.region,
                parse_region_apis(
                    config.region, config.region_api, allow_http=config.region_api_allow_http
                ),
                timeout_s=config.region_api_timeout_s,
            )
            app[REGION_LOOKUP] = await stack.enter_async_context(lookup)
        runner = ProblemAppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, config.http_host, config.http_port).start()
        log.info(
            "api_listening", host=config.http_host, port=config.http_port, workers=config.workers
        )
        env = worker_env(config, os.environ, multiproc_dir)
        async with asyncio.TaskGroup() as group:
            for index in range(config.workers):
                group.create_task(
                    critical(f"supervise-worker-{index}", _supervise_one(index, env, stop)),
                    name=f"supervise-{index}",
                )
            watch = group.create_task(
                critical("layout-watch", watch_layout(client, manifest)), name="layout-watch"
            )
            await stop.wait()
            watch.cancel()
    finally:
        if runner is not None:
            await runner.cleanup()
        await stack.aclose()
        await client.aclose()
        shutil.rmtree(multiproc_dir, ignore_errors=True)
