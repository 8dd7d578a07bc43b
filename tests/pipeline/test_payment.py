"""The payment step against the simulated gateway: retries, declines, exhaustion, determinism."""

from __future__ import annotations

import pytest

from pipeline.errors import PaymentDeclined, TransientError
from pipeline.payment import PayStep, SimulatedGateway
from pipeline.records import OrderContext, StreamEntry, Transition
from tests.helpers import make_order


def reserved_context(seq: int = 0) -> OrderContext:
    """An order that holds its stock and waits for payment."""
    order = make_order("pay-dev", seq)
    return OrderContext(StreamEntry("orders:{0}", "1-1", {}), order, status="reserved")


class ScriptedGateway:
    """A gateway double answering from a script of outcomes, recording attempts."""

    def __init__(self, outcomes: list[Exception | None]) -> None:
        self.outcomes = outcomes
        self.attempts: list[int] = []

    async def charge(self, key: str, amount: int, currency: str, attempt: int) -> None:
        """Pop the next scripted outcome."""
        self.attempts.append(attempt)
        outcome = self.outcomes.pop(0)
        if outcome is not None:
            raise outcome


async def test_transient_failures_are_retried_then_confirm() -> None:
    """Two transient failures, then success: confirmed on the third attempt."""
    gateway = ScriptedGateway([TransientError("t", "a"), TransientError("t", "b"), None])
    ctx = reserved_context()
    await PayStep(gateway, attempts=3, backoff_ms=1).run([ctx])
    assert gateway.attempts == [1, 2, 3]
    assert ctx.proposed == Transition("confirmed")


async def test_exhausted_retries_and_declines_fail_the_order() -> None:
    """Transient past the last attempt → failed/payment_unavailable; a decline → failed at once."""
    flaky = ScriptedGateway([TransientError("t", "a"), TransientError("t", "b")])
    ctx = reserved_context()
    await PayStep(flaky, attempts=2, backoff_ms=1).run([ctx])
    assert ctx.proposed == Transition("failed", "payment_unavailable")
    declining = ScriptedGateway([PaymentDeclined("d", "no")])
    ctx = reserved_context()
    await PayStep(declining, attempts=3, backoff_ms=1).run([ctx])
    assert declining.attempts == [1]
    assert ctx.proposed == Transition("failed", "payment_declined")


async def test_only_reserved_orders_are_charged() -> None:
    """An order in another state is left alone."""
    gateway = ScriptedGateway([])
    ctx = reserved_context()
    ctx.status = "validated"
    await PayStep(gateway, attempts=3, backoff_ms=1).run([ctx])
    assert gateway.attempts == []
    assert ctx.proposed is None


@pytest.mark.parametrize("seed", [1, 2])
async def test_simulated_gateway_is_seeded_per_order_and_attempt(seed: int) -> None:
    """Same seed, order and attempt → same answer; the rates shape the mix."""
    gateway = SimulatedGateway(failure_rate=0.3, decline_rate=0.2, seed=seed)

    async def outcome(order_id: str, attempt: int) -> str:
        try:
            await gateway.charge(order_id, 100, "EUR", attempt)
        except TransientError:
            return "transient"
        except PaymentDeclined:
            return "declined"
        return "ok"

    first = [await outcome(f"order-{i:04d}", 1) for i in range(400)]
    again = [await outcome(f"order-{i:04d}", 1) for i in range(400)]
    assert first == again
    assert 40 < first.count("declined") < 120  # about 20 % of 400
    assert 80 < first.count("transient") < 160  # about 30 %
    assert "seed=" in repr(gateway)
