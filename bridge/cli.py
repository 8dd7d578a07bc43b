"""`order-bridge`: the cloud bridge from MQTT to sharded Redis Streams."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from collections.abc import Sequence

import structlog

from servicekit import layout, tracing
from servicekit.config import (
    ConfigError,
    add_config_arguments,
    given_fields,
    load_config,
    secret_flags_given,
)
from servicekit.credentials import warn_if_redis_unauthenticated, warn_secret_flags
from servicekit.logs import configure_logging
from servicekit.loops import critical, failed_loops
from servicekit.version import add_version_argument

from .config import BridgeConfig
from .errors import BridgeError
from .heartbeat import RedisHeartbeat
from .layout import LayoutCheck
from .metrics import BridgeMetrics
from .regions import build_region_sinks
from .service import Bridge, build_sink

log = structlog.get_logger(__name__)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse settings, run the bridge until SIGTERM/SIGINT, return the exit code."""
    parser = argparse.ArgumentParser(
        prog="order-bridge", description="the cloud bridge: MQTT orders → Redis Streams"
    )
    add_version_argument(parser)
    add_config_arguments(parser, BridgeConfig)
    args = parser.parse_args(argv)
    try:
        config = load_config(BridgeConfig, args)
        shards_given = "shards" in given_fields(BridgeConfig, args)
    except ConfigError as exc:
        print(f"order-bridge: {exc}", file=sys.stderr)
        return 2
    configure_logging(config.log_level, service="order-bridge")
    warn_secret_flags(secret_flags_given(BridgeConfig, args))
    for url in {config.local_redis_url, *config.region_urls().values()}:
        warn_if_redis_unauthenticated(url)
    try:
        import uvloop  # noqa: PLC0415 - optional speed-up, absent on Windows
    except ImportError:
        runner = asyncio.run
    else:
        runner = uvloop.run
    tracing.configure(
        config.otlp_endpoint, sample_ratio=config.trace_sample_ratio,
        service_name="order-bridge", attributes={"service.instance.id": config.client_id},
    )  # fmt: skip
    try:
        runner(_serve(config, shards_given=shards_given))
    except BridgeError as exc:
        log.error("bridge failed", error=str(exc))  # noqa: TRY400 - the message says it all
        return 1
    except Exception as exc:
        if (refusal := layout.refusal_in(exc)) is not None:
            log.error("bridge refused to run", error=str(refusal))  # noqa: TRY400
            print(f"order-bridge: {refusal}", file=sys.stderr)
            return 2
        loops = failed_loops(exc)
        if not loops:
            raise
        log.critical("bridge exiting: a background loop failed", loops=[f.loop for f in loops])
        return 1
    finally:
        tracing.shutdown()  # export the spans still buffered
    return 0


async def _serve(config: BridgeConfig, *, shards_given: bool = True) -> None:
    check = LayoutCheck(config, shards_given=shards_given)
    try:
        await _run(config, check)
    finally:
        await check.aclose()


async def _run(config: BridgeConfig, check: LayoutCheck) -> None:
    heartbeat = RedisHeartbeat(
        config.local_redis_url,
        cluster=config.redis_cluster,
        timeout_s=config.redis_timeout_s,
        sentinels=config.redis_sentinel,
        sentinel_master=config.redis_sentinel_master,
    )
    async with build_sink(config) as sink, heartbeat, contextlib.AsyncExitStack() as stack:
        region_sinks = {
            name: await stack.enter_async_context(remote)
            for name, remote in build_region_sinks(config).items()
        }
        if config.geo:
            log.info("geo mode", region=config.region, remote_regions=sorted(region_sinks))
        bridge = Bridge(
            config,
            sink,
            BridgeMetrics(),
            heartbeat=heartbeat,
            region_sinks=region_sinks,
            layout=check.start,
        )
        main_task = asyncio.current_task()
        loop = asyncio.get_running_loop()

        def on_signal() -> None:
            if bridge.started:
                bridge.request_stop()
            elif main_task is not None:
                main_task.cancel()  # still connecting: nothing to drain

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal)
        try:
            async with asyncio.TaskGroup() as tasks:
                watch = tasks.create_task(
                    critical("layout-watch", check.watch()),
                    name="layout-watch",
                )
                await bridge.run()
                watch.cancel()
        except asyncio.CancelledError:
            log.info("stopped before connecting")


if __name__ == "__main__":
    sys.exit(main())
