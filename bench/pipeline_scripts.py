"""Benchmark: one worker's batches in this process, and Redis's CPU per order for each script.

Not a test. Starts a private Redis, appends ``--orders`` one-line orders (as
``bench/pipeline_throughput.py`` does), then drives :meth:`Worker.settle` and
:meth:`Worker.finish` over them in this process, with statuses encoded but not
sent (no broker). Prints per order: this process's CPU (the worker's Python),
Redis's CPU, Redis's CPU inside each script call (``INFO cpu`` read around
every call, so the calls are timed one by one; that adds a round trip per call
to the Python figure), and the ``INFO commandstats`` line of the pipeline bench.

It resolves 1-3 µs per order where the full bench cannot on a shared machine
(worker processes, a broker and other work on the same cores): run it for two
commits, interleaved, several times each (``PYTHONPATH`` on a ``git archive``).

    .venv/bin/python -m bench.pipeline_scripts --orders 10000 --batch 20
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry

import pipeline._calls
import pipeline.records
import pipeline.stock
from bench.pipeline_throughput import (
    Backend,
    append,
    command_line,
    make_orders,
    prepare,
    stats_delta,
)
from pipeline._lua import Scripts
from pipeline.config import PipelineConfig
from pipeline.metrics import WorkerMetrics
from pipeline.steps import StepDeps, build_chain
from pipeline.worker import Worker
from schemas import Status, encode
from schemas.names import DEFAULT_SHARDS, PIPELINE_GROUP
from testrig.servers import RedisProcess


class EncodingSink:
    """A status sender that encodes each status (the worker's share of sending) and drops it."""

    def send(self, messages: Sequence[tuple[str, Status]]) -> int:
        """Encode every status; return how many."""
        for _device_id, status in messages:
            encode(status)
        return len(messages)


def time_scripts(backend: Backend, spent: dict[str, float]) -> None:
    """Make every script call of the load, reserve and commit add Redis's CPU to ``spent``."""
    run_calls, run_calls_with = pipeline._calls.run_calls, pipeline._calls.run_calls_with

    async def timed(client: Any, scripts: Any, name: str, calls: Any, **riders: Any) -> list[Any]:
        before = await backend.cpu_s()
        if riders:
            out = await run_calls_with(client, scripts, name, calls, **riders)
        else:
            out = await run_calls(client, scripts, name, calls)
        spent[name] = spent.get(name, 0.0) + await backend.cpu_s() - before
        return out

    for module, name in ((pipeline.records, "run_calls"), (pipeline.records, "run_calls_with"),
                         (pipeline.stock, "run_calls")):  # fmt: skip
        setattr(module, name, timed)


async def run(args: argparse.Namespace) -> None:
    """Append, warm up with one batch, then time the rest."""
    with (
        tempfile.TemporaryDirectory(prefix="bench-scripts-") as tmp,
        RedisProcess(Path(tmp) / "redis") as server,
    ):
        backend = Backend("1 node", server.url, False, [server.port])
        client = aioredis.Redis.from_url(server.url)
        config = msgspec.structs.replace(
            PipelineConfig(), shards=args.shards, batch_size=args.batch,
            gateway_latency_ms=0, consumer="bench",
        )  # fmt: skip
        await prepare(client, args.shards, [PIPELINE_GROUP])
        scripts = Scripts()
        chain = build_chain(config.steps, StepDeps(client, scripts, config))
        worker = Worker(client, EncodingSink(), chain, config, WorkerMetrics(CollectorRegistry()),
                        scripts=scripts)  # fmt: skip
        await worker.setup()
        await append(client, make_orders(args.orders, args.devices), args.shards)
        entries = await worker.read()
        await worker.finish(await worker.settle(entries))  # warm-up: scripts loaded, caches
        spent: dict[str, float] = {}
        if not args.no_script_times:
            time_scripts(backend, spent)
        stats0 = await backend.command_stats()
        redis0 = await backend.cpu_s()
        cpu0 = time.process_time()
        done, left = 0, args.orders - len(entries)
        while done < left:  # a read of empty streams would block for block_ms
            entries = await worker.read()
            await worker.finish(await worker.settle(entries))
            done += len(entries)
        await worker.flush_acks()
        cpu_s = time.process_time() - cpu0
        redis_s = await backend.cpu_s() - redis0
        commands = stats_delta(stats0, await backend.command_stats())
        await client.aclose()
    print(f"{done} orders, batches of up to {args.batch} per shard × {args.shards} shards: "
          f"worker (this process) {cpu_s / done * 1e6:.1f} µs, Redis {redis_s / done * 1e6:.1f} "
          "µs per order")  # fmt: skip
    if spent:
        per_script = ", ".join(f"{name} {s / done * 1e6:.1f} µs" for name, s in spent.items())
        print(f"  Redis CPU per order inside each script call: {per_script}")
    print("  Redis per order (calls × µs inside Redis): " + command_line(commands, done))


def main() -> None:
    """Parse flags and run."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--orders", type=int, default=10_000)
    parser.add_argument("--devices", type=int, default=500)
    parser.add_argument("--shards", type=int, default=DEFAULT_SHARDS)
    parser.add_argument("--batch", type=int, default=20, help="XREADGROUP COUNT per shard")
    parser.add_argument(
        "--no-script-times", action="store_true", help="no INFO cpu around each script call"
    )
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
