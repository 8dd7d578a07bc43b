"""Payment: a gateway behind a Protocol, a simulated gateway, and the step that charges.

The simulated gateway draws its outcome from an RNG seeded with
``(seed, idempotency key, attempt)``: the same order gets the same answers in any
worker process and on any redelivery, which keeps runs reproducible and makes
concurrent retries of one order agree.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence
from typing import Protocol

from servicekit.backoff import Backoff

from .errors import PaymentDeclined, TransientError
from .records import OrderContext
from .steps import Step, StepDeps, register

PAYMENT_DECLINED = "payment_declined"
PAYMENT_UNAVAILABLE = "payment_unavailable"
MAX_BACKOFF_S = 2.0


class PaymentGateway(Protocol):
    """Charges orders; ``key`` (``{device_id}:{order_id}``) is the idempotency key."""

    async def charge(self, key: str, amount: int, currency: str, attempt: int) -> None:
        """Charge ``amount`` minor units.

        Raises:
            TransientError: try again later.
            PaymentDeclined: refused for good.
        """


class SimulatedGateway:
    """A gateway with configurable latency, transient failure rate and decline rate."""

    def __init__(
        self,
        *,
        latency_ms: float = 0.0,
        failure_rate: float = 0.0,
        decline_rate: float = 0.0,
        seed: int = 0,
    ) -> None:
        self.latency_s = latency_ms / 1000
        self.failure_rate = failure_rate
        self.decline_rate = decline_rate
        self.seed = seed

    def __repr__(self) -> str:
        return (
            f"SimulatedGateway(latency_s={self.latency_s}, failure_rate={self.failure_rate}, "
            f"decline_rate={self.decline_rate}, seed={self.seed})"
        )

    async def charge(self, key: str, amount: int, currency: str, attempt: int) -> None:
        """Wait the latency, then succeed, fail transiently or decline, as the RNG says."""
        if self.latency_s:
            await asyncio.sleep(self.latency_s)
        if not (self.failure_rate or self.decline_rate):
            return
        draw = random.Random(f"{self.seed}:{key}:{attempt}").random()
        if draw < self.decline_rate:
            raise PaymentDeclined(PAYMENT_DECLINED, f"{key}: card declined")
        if draw < self.decline_rate + self.failure_rate:
            raise TransientError(PAYMENT_UNAVAILABLE, f"{key}: gateway unavailable")


class PayStep:
    """``reserved → confirmed``; a decline, or transient failures past the last
    attempt, end the order ``failed`` (and the commit releases its stock)."""

    name = "pay"

    def __init__(self, gateway: PaymentGateway, *, attempts: int, backoff_ms: float) -> None:
        self.gateway = gateway
        self.attempts = max(1, attempts)
        self.backoff_s = backoff_ms / 1000

    async def run(self, batch: Sequence[OrderContext]) -> None:
        """Charge every reserved order of the batch concurrently."""
        todo = [ctx for ctx in batch if ctx.status == "reserved"]
        if not todo:
            return
        async with asyncio.TaskGroup() as group:
            for ctx in todo:
                group.create_task(self._pay(ctx), name=f"pay-{ctx.order.order_id}")

    async def _pay(self, ctx: OrderContext) -> None:
        order = ctx.order
        key = f"{order.device_id}:{order.order_id}"
        backoff = Backoff(self.backoff_s, MAX_BACKOFF_S)
        for attempt in range(1, self.attempts + 1):
            try:
                await self.gateway.charge(key, order.total, order.currency, attempt)
            except PaymentDeclined:
                ctx.fail(PAYMENT_DECLINED)
                return
            except TransientError:
                if attempt == self.attempts:
                    ctx.fail(PAYMENT_UNAVAILABLE)
                    return
                await backoff.wait()
            else:
                ctx.advance("confirmed")
                return


@register("pay")
def _pay(deps: StepDeps) -> Step:
    config = deps.config
    gateway = SimulatedGateway(
        latency_ms=config.gateway_latency_ms,
        failure_rate=config.gateway_failure_rate,
        decline_rate=config.gateway_decline_rate,
        seed=config.gateway_seed,
    )
    return PayStep(gateway, attempts=config.payment_attempts, backoff_ms=config.payment_backoff_ms)
