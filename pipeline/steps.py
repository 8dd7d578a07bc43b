"""Steps: small pluggable units the worker runs on every batch, in configured order.

A step is anything with a ``name`` and ``async run(batch)``. It gets the live
orders of a batch that have not passed it yet, sorted by device and ``seq``,
and records a decision on each (``ctx.advance``, ``ctx.reject``, ``ctx.fail``);
the worker applies them in memory after the step and stores all of a batch's
decisions at once after the last step (one commit script, atomic per order).
A crash before that commit runs the steps again on redelivery, so a step with
effects outside the order record makes them idempotent per order itself, as
the reserve step does in its own script and the payment gateway does with its
idempotency key. A step raises
:class:`~pipeline.errors.StepError` (or anything) when it cannot decide; the
worker then retries the batch one order at a time so that one poison order
cannot hold the others back.

New steps are added with :func:`register` or named as ``module:factory`` in the
``steps`` setting; the worker loop never changes.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from ._calls import AnyRedis
from ._lua import Scripts
from .config import PipelineConfig
from .errors import UnknownStepError
from .records import OrderContext


@runtime_checkable
class Step(Protocol):
    """One stage of the order chain."""

    name: str

    async def run(self, batch: Sequence[OrderContext]) -> None:
        """Decide for every order of ``batch``; raise if that is impossible."""


@dataclass(frozen=True)
class StepDeps:
    """What a step factory may use to build its step."""

    redis: AnyRedis
    scripts: Scripts
    config: PipelineConfig


StepFactory = Callable[[StepDeps], Step]
_REGISTRY: dict[str, StepFactory] = {}


def register(name: str) -> Callable[[StepFactory], StepFactory]:
    """Decorator: make a step factory available under ``name`` in the ``steps`` setting."""

    def decorate(factory: StepFactory) -> StepFactory:
        _REGISTRY[name] = factory
        return factory

    return decorate


def registered() -> list[str]:
    """Names of the registered steps."""
    _load_builtin()
    return sorted(_REGISTRY)


def build_chain(spec: str, deps: StepDeps) -> list[Step]:
    """Build the steps named in ``spec`` (comma-separated names or ``module:factory``).

    Raises:
        UnknownStepError: a name is not registered or its import fails.
    """
    _load_builtin()
    chain: list[Step] = []
    for raw in spec.split(","):
        name = raw.strip()
        if not name:
            continue
        factory = _REGISTRY.get(name) or _import_factory(name)
        step = factory(deps)
        if not isinstance(step, Step):
            raise UnknownStepError("not_a_step", f"{name} did not build a Step")
        chain.append(step)
    if len({step.name for step in chain}) != len(chain):
        raise UnknownStepError("duplicate_step", f"a step appears twice in {spec!r}")
    return chain


def _import_factory(path: str) -> StepFactory:
    module_name, _, attr = path.partition(":")
    if not attr:
        raise UnknownStepError("unknown_step", f"no step {path!r}; known: {sorted(_REGISTRY)}")
    try:
        factory: StepFactory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise UnknownStepError("unknown_step", f"cannot import {path!r}: {exc}") from exc
    return factory


def _load_builtin() -> None:
    # The built-in steps register themselves on import.
    from . import catalog, payment, stock  # noqa: F401, PLC0415


class FulfilStep:
    """Hand a paid order over to fulfilment: ``confirmed → fulfilled``.

    The simulated fulfilment has no side effect beyond the transition.
    """

    name = "fulfil"

    async def run(self, batch: Sequence[OrderContext]) -> None:
        """Fulfil every confirmed order."""
        for ctx in batch:
            if ctx.status == "confirmed":
                ctx.advance("fulfilled")


@register("fulfil")
def _fulfil(_deps: StepDeps) -> Step:
    return FulfilStep()
