"""The load a run offers and the waits that end it: Poisson orders, quiescence, heard statuses.

Shared by the single-process run (:mod:`fleet.sim`) and each worker process of a
multi-process run (:mod:`fleet.workers`), which offers its share of the rate
to its share of the devices.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Iterable

import structlog
from redis.exceptions import RedisError

from servicekit.redis_clients import AnyRedis

from .devices import Catalog, Fleet, SimDevice
from .light import LightDevice
from .statuses import order_statuses
from .tracker import TERMINAL, Tracker
from .verify import OrderRef

log = structlog.get_logger(__name__)

SUBMIT_CONCURRENCY = 2_000
# Arrivals due within this much are placed at once: one loop turn per arrival would
# cost more than a light device's whole order at thousands a second.
MIN_SLEEP_S = 0.001
PLACED_WITHOUT_YIELD = 100
SETTLE_STALLED_POLLS = 4  # polls (0.5 s apart) without a status heard before Redis is asked
# Each lookup that leaves orders open doubles the polls before the next, up to this:
# once stalled, the lookup of every open order ran at every poll (0.5 s) for as long as
# their statuses were late, minutes on an overloaded machine.
SETTLE_MAX_STALLED_POLLS = 32


async def offer_orders(
    fleet: Fleet,
    *,
    rate: float,
    duration_s: float,
    rng: random.Random,
    catalog: Catalog,
    started: float,
    concurrency: int = SUBMIT_CONCURRENCY,
) -> None:
    """Poisson arrivals at ``rate × fleet.rate_factor`` orders/s over random devices,
    at most ``concurrency`` submits in flight.

    The factor is read at every arrival, so the ``spike`` chaos kind changes the
    offered rate while the load runs.
    """
    end = started + duration_s
    if rate <= 0 or not fleet.devices:
        await asyncio.sleep(max(0.0, end - time.monotonic()))
        return
    slots = asyncio.Semaphore(concurrency)
    next_at = started

    async def one(device: SimDevice, body: dict[str, object]) -> None:
        try:
            await device.submit(body)
        finally:
            slots.release()

    behind = 0
    async with asyncio.TaskGroup() as tg:
        while True:
            next_at += rng.expovariate(rate * fleet.rate_factor)
            if next_at >= end:
                break
            if (delay := next_at - time.monotonic()) > MIN_SLEEP_S:
                await asyncio.sleep(delay)
                behind = 0
            elif (behind := behind + 1) >= PLACED_WITHOUT_YIELD:
                # Behind schedule (a starved process): without a yield the backlog would be
                # placed in one loop turn while receipts wait unread in the sockets.
                await asyncio.sleep(0)
                behind = 0
            device = rng.choice(fleet.devices)
            if isinstance(device, LightDevice):
                device.offer(catalog.order_body(rng))  # synchronous: no task per order
                continue
            await slots.acquire()
            tg.create_task(one(device, catalog.order_body(rng)))
    await asyncio.sleep(max(0.0, end - time.monotonic()))


async def await_heard(tracker: Tracker, timeout_s: float) -> None:
    """Wait until every device heard a terminal status for each of its accepted orders."""
    deadline = time.monotonic() + timeout_s
    # Only the unheard are looked at again: a scan of every accepted order each 0.2 s
    # cost the simulator seconds of CPU while a few statuses came late.
    unheard = [ref for ref in tracker.accepted if ref not in tracker.terminal]
    while unheard:
        if time.monotonic() > deadline:
            log.warning("terminal statuses never heard", orders=len(unheard))
            return
        await asyncio.sleep(0.2)
        unheard = [ref for ref in unheard if ref not in tracker.terminal]


TerminalLookup = Callable[[list[OrderRef]], Awaitable[set[OrderRef]]]
"""refs → those the pipeline has a terminal status for (an unreachable Redis: none)."""


async def terminal_in(
    clients: Iterable[AnyRedis], refs: list[OrderRef], shards: int
) -> set[OrderRef]:
    """The refs with a terminal status in any of ``clients`` that answers."""
    done: set[OrderRef] = set()
    for client in clients:
        todo = [ref for ref in refs if ref not in done]
        if not todo:
            break
        try:
            found = await order_statuses(client, todo, shards)
        except (RedisError, OSError):
            continue
        done |= {ref for ref, s in zip(todo, found, strict=True) if s in TERMINAL}
    return done


async def settle(
    fleet: Fleet, tracker: Tracker, terminal: TerminalLookup, timeout_s: float
) -> bool:
    """Wait until every outbox is empty and every accepted order has a terminal status."""
    deadline = time.monotonic() + timeout_s
    waiting: set[OrderRef] = set(tracker.accepted)
    before, stalled, patience = -1, 0, SETTLE_STALLED_POLLS
    while True:
        depth = fleet.outbox_depth()
        if depth == 0:
            heard = tracker.terminal
            waiting = {ref for ref in waiting if ref not in heard}  # O(waiting), not O(heard)
            if len(waiting) == before:
                stalled += 1
            else:
                stalled, patience = 0, SETTLE_STALLED_POLLS
            before = len(waiting)
            # Redis is asked only once the devices stopped hearing statuses for a while:
            # while a backlog drains, asking for thousands of orders twice a second
            # costs the simulator more than its devices do.
            if waiting and stalled >= patience:
                waiting -= await terminal(sorted(waiting))
                before = len(waiting)
                stalled, patience = 0, min(patience * 2, SETTLE_MAX_STALLED_POLLS)
            if not waiting:
                return True
        if time.monotonic() > deadline:
            log.warning("not quiescent", outbox_depth=depth, without_status=len(waiting))
            return False
        await asyncio.sleep(0.5)
