"""Devices spread over worker processes: one coordinator, N workers, one verification.

``fleet-sim --processes N`` starts N worker processes (``spawn``), each running
a slice of the devices (its own :class:`fleet.devices.Fleet`, tracker and
Poisson load at ``rate / N``) in its own event loop and core. The coordinator
keeps the stack, the proxy, the chaos schedule, the live view, the
verification and the report; :class:`RemoteFleet` is its view of the workers.

Each worker talks to the coordinator over one duplex pipe::

    worker → coordinator   ("connected", n)  ("sample", WorkerSample)  ("loaded",)
                           ("reply", id, value)  ("done", WorkerFinal)  ("error", text)
    coordinator → worker   ("start", t0)  ("rate", factor)  ("call", id, name, args)
                           ("settle",)

Times are ``time.monotonic()`` values, which Linux's CLOCK_MONOTONIC makes
comparable across the processes of one machine. Every worker settles its own
devices (outboxes empty, statuses heard) and then sends what it accepted; the
coordinator merges that into its tracker and verifies once.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import multiprocessing as mp
import random
import signal
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import redis.asyncio as aioredis
import structlog

from servicekit.logs import configure_logging

from .devices import Catalog, Fleet, FleetSettings
from .errors import ChaosError, FleetError
from .load import await_heard, offer_orders, settle, terminal_in
from .loops import runner
from .tracker import Tracker
from .verify import OrderRef

log = structlog.get_logger(__name__)

SAMPLE_EVERY_S = 0.5
POLL_S = 0.05
EXIT_WAIT_S = 60.0
# What a worker answers to ("call", …): Fleet methods chaos needs.
CALLS = frozenset({"flood", "reconnected_since", "connect_attempts_since"})


@dataclass(frozen=True)
class WorkerSpec:
    """What one worker process runs: its devices and its share of the load."""

    index: int
    fleet: FleetSettings
    rate: float
    duration_s: float
    seed: int
    catalog: Path
    redis_url: str
    settle_timeout_s: float
    status_wait_s: float
    connect_timeout_s: float
    shards: int
    log_level: str = "error"


@dataclass(frozen=True)
class WorkerSample:
    """A worker's gauges and counters now, and the latencies measured since its last sample."""

    connected: int
    outbox_depth: int
    submitted: int
    receipted: int
    processed: int
    receipt_ms: list[float]
    e2e_ms: list[float]


@dataclass(frozen=True)
class WorkerFinal:
    """What a worker's devices accepted and heard, once they settled."""

    accepted: list[OrderRef]
    receipted: set[OrderRef]
    terminal: set[OrderRef]
    refused: int
    duplicate_receipts: int
    settled: bool
    # Monotonic times (comparable across processes) for the report's stage breakdown.
    submit_at: dict[OrderRef, float]
    published_at: dict[OrderRef, float]
    terminal_at: dict[OrderRef, float]


def split(devices: int, processes: int) -> list[tuple[int, int]]:
    """(first index, count) of each worker's slice: as even as can be, none empty."""
    processes = max(1, min(processes, devices))
    base, extra = divmod(devices, processes)
    slices, first = [], 0
    for i in range(processes):
        count = base + (1 if i < extra else 0)
        slices.append((first, count))
        first += count
    return slices


def split_total(total: int, weights: list[int]) -> list[int]:
    """``total`` split in proportion to ``weights``, none over its weight, adding up."""
    whole = sum(weights)
    shares = [min(w, total * w // whole) if whole else 0 for w in weights]
    for i, w in enumerate(weights):
        extra = min(w - shares[i], total - sum(shares))
        shares[i] += max(0, extra)
    return shares


def worker_specs(
    fleet: FleetSettings, processes: int, *, rate: float, seed: int, **common: Any
) -> list[WorkerSpec]:
    """One spec per worker: a slice of the devices and the same share of the rate each."""
    slices = split(fleet.devices, processes)
    # Each slice ends with its share of the light devices (the last of the fleet's
    # devices are light in a single process; spread, each worker runs some).
    light = split_total(fleet.light_devices, [count for _, count in slices])
    return [
        WorkerSpec(
            index=i,
            fleet=replace(
                fleet,
                devices=count,
                first_index=first,
                ramp_per_s=fleet.ramp_per_s / len(slices),
                light_devices=light[i],
            ),
            rate=rate * count / fleet.devices,
            seed=seed * 1_000 + i,
            **common,
        )
        for i, (first, count) in enumerate(slices)
    ]


# --- the worker process ---


def worker_main(spec: WorkerSpec, conn: Connection) -> None:
    """Entry point of a worker process (``spawn``): run the slice, report, exit."""
    # Ctrl-C reaches the whole process group; the coordinator decides what stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    configure_logging(spec.log_level, service=f"fleet-sim-worker-{spec.index}")
    try:
        light_only = spec.fleet.light_devices >= spec.fleet.devices
        runner(light_only=light_only)(_serve(spec, conn))
    except BaseException as exc:
        with contextlib.suppress(OSError):
            conn.send(("error", "".join(traceback.format_exception(exc)).strip()))
        raise
    finally:
        conn.close()


async def _serve(spec: WorkerSpec, conn: Connection) -> None:
    loop = asyncio.get_running_loop()
    inbox: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()

    def readable() -> None:
        try:
            while conn.poll():
                inbox.put_nowait(conn.recv())
        except (EOFError, OSError):
            loop.remove_reader(conn.fileno())
            inbox.put_nowait(("gone",))

    loop.add_reader(conn.fileno(), readable)
    tracker = Tracker()
    catalog = Catalog.load(spec.catalog)
    rng = random.Random(spec.seed)
    client = aioredis.from_url(spec.redis_url)
    try:
        async with Fleet(spec.fleet, tracker) as fleet:
            connected = await fleet.wait_connected(1.0, spec.connect_timeout_s)
            seen = [0, 0]
            conn.send(("sample", _sample(fleet, tracker, seen)))  # the gauges before the load
            conn.send(("connected", connected))
            message = await inbox.get()
            if message[0] != "start":
                return  # the coordinator gave up before the load
            settle_now = asyncio.Event()
            async with asyncio.TaskGroup() as tg:
                reporter = tg.create_task(_report(conn, fleet, tracker, seen), name="reporter")
                obeying = tg.create_task(_obey(conn, inbox, fleet, settle_now), name="commands")
                await offer_orders(
                    fleet,
                    rate=spec.rate,
                    duration_s=spec.duration_s,
                    rng=rng,
                    catalog=catalog,
                    started=float(message[1]),
                )
                conn.send(("loaded",))
                await settle_now.wait()
                terminal = functools.partial(terminal_in, [client], shards=spec.shards)
                settled = await settle(fleet, tracker, terminal, spec.settle_timeout_s)
                await await_heard(tracker, spec.status_wait_s)
                reporter.cancel()
                obeying.cancel()
            conn.send(("sample", _sample(fleet, tracker, seen)))
            conn.send(
                (
                    "done",
                    WorkerFinal(
                        tracker.accepted,
                        tracker.receipted,
                        tracker.terminal,
                        tracker.refused,
                        tracker.duplicate_receipts,
                        settled,
                        tracker.submit_at,
                        tracker.published_at,
                        tracker.terminal_at,
                    ),
                )
            )
    finally:
        await client.aclose()
        with contextlib.suppress(ValueError, OSError):
            loop.remove_reader(conn.fileno())


def _sample(fleet: Fleet, tracker: Tracker, seen: list[int]) -> WorkerSample:
    receipt_ms = tracker.receipt_latency_ms[seen[0] :]
    e2e_ms = tracker.e2e_latency_ms[seen[1] :]
    seen[:] = [len(tracker.receipt_latency_ms), len(tracker.e2e_latency_ms)]
    return WorkerSample(
        fleet.connected(),
        fleet.outbox_depth(),
        len(tracker.accepted),
        len(tracker.receipted),
        len(tracker.terminal),
        receipt_ms,
        e2e_ms,
    )


async def _report(conn: Connection, fleet: Fleet, tracker: Tracker, seen: list[int]) -> None:
    while True:
        conn.send(("sample", _sample(fleet, tracker, seen)))
        await asyncio.sleep(SAMPLE_EVERY_S)


async def _obey(
    conn: Connection, inbox: asyncio.Queue[tuple[Any, ...]], fleet: Fleet, settle_now: asyncio.Event
) -> None:
    while True:
        message = await inbox.get()
        match message:
            case ("rate", factor):
                fleet.set_rate_factor(float(factor))
            case ("call", call_id, name, args) if name in CALLS:
                conn.send(("reply", call_id, await getattr(fleet, name)(*args)))
            case ("settle",):
                settle_now.set()
            case ("gone",):
                raise FleetError("the coordinator is gone")
            case _:
                raise FleetError(f"unexpected message from the coordinator: {message!r}")


# --- the coordinator's side ---


@dataclass
class _Worker:
    spec: WorkerSpec
    process: Any  # multiprocessing's SpawnProcess
    conn: Connection
    connected: int | None = None
    sample: WorkerSample | None = None
    loaded: bool = False
    final: WorkerFinal | None = None
    replies: dict[int, asyncio.Future[Any]] = field(default_factory=dict)


class RemoteFleet:
    """The coordinator's view of the worker processes; a :class:`fleet.chaos.FleetControl`.

    ``async with`` starts the workers (each connects its devices) and stops them
    all on exit, whatever happened.
    """

    def __init__(self, specs: list[WorkerSpec], tracker: Tracker) -> None:
        self.specs = specs
        self.tracker = tracker
        self._workers: list[_Worker] = []
        self._failure: FleetError | None = None
        self._calls = itertools.count()

    async def __aenter__(self) -> Self:
        context = mp.get_context("spawn")
        loop = asyncio.get_running_loop()
        try:
            for spec in self.specs:
                parent, child = context.Pipe()
                process = context.Process(
                    target=worker_main,
                    args=(spec, child),
                    name=f"fleet-sim-worker-{spec.index}",
                    daemon=True,
                )
                process.start()
                child.close()
                worker = _Worker(spec, process, parent)
                self._workers.append(worker)
                loop.add_reader(parent.fileno(), self._readable, worker)
        except BaseException:
            await self._stop()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._stop()

    async def _stop(self) -> None:
        loop = asyncio.get_running_loop()
        for worker in self._workers:
            with contextlib.suppress(ValueError, OSError):
                loop.remove_reader(worker.conn.fileno())
            if worker.final is None:
                worker.process.terminate()
        for worker in self._workers:
            await asyncio.to_thread(worker.process.join, EXIT_WAIT_S)
            if worker.process.is_alive():
                worker.process.kill()
                await asyncio.to_thread(worker.process.join, 5)
            worker.conn.close()

    def _readable(self, worker: _Worker) -> None:
        try:
            while worker.conn.poll():
                self._receive(worker, worker.conn.recv())
        except (EOFError, OSError):
            asyncio.get_running_loop().remove_reader(worker.conn.fileno())
            if worker.final is None:
                self._fail(FleetError(f"worker {worker.spec.index} exited before it finished"))

    def _receive(self, worker: _Worker, message: tuple[Any, ...]) -> None:
        match message:
            case ("connected", count):
                worker.connected = int(count)
            case ("sample", WorkerSample() as sample):
                worker.sample = sample
                self.tracker.add_latencies(sample.receipt_ms, sample.e2e_ms)
            case ("loaded",):
                worker.loaded = True
            case ("reply", call_id, value):
                future = worker.replies.pop(call_id, None)
                if future is not None and not future.done():
                    future.set_result(value)
            case ("done", WorkerFinal() as final):
                worker.final = final
            case ("error", text):
                self._fail(FleetError(f"worker {worker.spec.index} failed:\n{text}"))
            case _:
                self._fail(FleetError(f"unexpected message from a worker: {message!r}"))

    def _fail(self, failure: FleetError) -> None:
        if self._failure is None:
            self._failure = failure
            log.error("fleet worker failed", error=str(failure))
        for worker in self._workers:
            for future in worker.replies.values():
                if not future.done():
                    future.set_exception(failure)
            worker.replies.clear()

    async def _until(self, done: Callable[[], bool], timeout_s: float | None = None) -> bool:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        # Polled: the conditions are fed by pipe callbacks; a few ms of slack is fine here.
        while not done():
            if self._failure is not None:
                raise self._failure
            if deadline is not None and time.monotonic() > deadline:
                return False
            await asyncio.sleep(POLL_S)
        return True

    def _send(self, message: tuple[Any, ...]) -> None:
        for worker in self._workers:
            try:
                worker.conn.send(message)
            except OSError as exc:
                self._fail(FleetError(f"worker {worker.spec.index} is gone: {exc}"))

    async def _call(self, name: str, *args: Any) -> list[Any]:
        if self._failure is not None:
            raise self._failure
        loop = asyncio.get_running_loop()
        futures: list[Awaitable[Any]] = []
        for worker in self._workers:
            call_id = next(self._calls)
            future: asyncio.Future[Any] = loop.create_future()
            worker.replies[call_id] = future
            futures.append(future)
            worker.conn.send(("call", call_id, name, args))
        return list(await asyncio.gather(*futures))

    @property
    def pids(self) -> list[int]:
        """The worker processes' pids."""
        return [w.process.pid for w in self._workers]

    # --- the run's steps ---

    async def wait_connected(self, timeout_s: float) -> int:
        """Wait until every worker started its devices and waited ``timeout_s`` for them.

        No deadline of its own: on a crowded machine starting thousands of agents
        takes minutes; a worker that dies or fails ends the wait at once.
        """
        await self._until(lambda: all(w.connected is not None for w in self._workers))
        return sum(w.connected or 0 for w in self._workers)

    async def offer(self, started: float) -> None:
        """Start every worker's load at monotonic ``started``; return when all are done."""
        self._send(("start", started))
        await self._until(lambda: all(w.loaded for w in self._workers))

    async def finish(self) -> bool:
        """Let the workers settle; merge what they accepted and heard; True if all settled."""
        self._send(("settle",))
        await self._until(lambda: all(w.final is not None for w in self._workers))
        finals = [w.final for w in self._workers if w.final is not None]
        for final in finals:
            self.tracker.accepted.extend(final.accepted)
            self.tracker.receipted |= final.receipted
            self.tracker.terminal |= final.terminal
            self.tracker.refused += final.refused
            self.tracker.duplicate_receipts += final.duplicate_receipts
            self.tracker.submit_at.update(final.submit_at)
            self.tracker.published_at.update(final.published_at)
            self.tracker.terminal_at.update(final.terminal_at)
        return all(final.settled for final in finals)

    def counts(self) -> tuple[int, int, int]:
        """Orders queued, receipted and with a terminal status heard, over all workers."""
        samples = [w.sample for w in self._workers if w.sample is not None]
        return (
            sum(s.submitted for s in samples),
            sum(s.receipted for s in samples),
            sum(s.processed for s in samples),
        )

    # --- FleetControl ---

    @property
    def size(self) -> int:
        return sum(spec.fleet.devices for spec in self.specs)

    def connected(self) -> int:
        return sum(w.sample.connected for w in self._workers if w.sample is not None)

    def outbox_depth(self) -> int:
        return sum(w.sample.outbox_depth for w in self._workers if w.sample is not None)

    def device_ids(self, count: int) -> list[str]:
        first = self.specs[0].fleet
        return [f"{first.prefix}-{i:05d}" for i in range(min(count, self.size))]

    def set_rate_factor(self, factor: float) -> None:
        self._send(("rate", factor))

    async def flood(self) -> int:
        return sum(await self._call("flood"))

    async def reconnected_since(self, t0: float) -> tuple[int, float | None]:
        replies = await self._call("reconnected_since", t0)
        lasts = [last for _, last in replies if last is not None]
        return sum(count for count, _ in replies), max(lasts, default=None)

    async def connect_attempts_since(self, t0: float) -> list[float]:
        return sorted(t for times in await self._call("connect_attempts_since", t0) for t in times)

    async def restart_disk_devices(self, between: Callable[[], Awaitable[None]]) -> int:
        raise ChaosError("agent-powercut needs --processes 1")
