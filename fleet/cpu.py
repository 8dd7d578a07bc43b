"""CPU the run cost: the load generator's own and, when fleet-sim started the stack, the cloud's.

Read from ``/proc`` (Linux) at the start of the load and after the run settled,
so both sides are charged over the same window: the load, the settling and the
status wait, not the fleet's connection ramp or the verification reads.

* **generator**: this process (``getrusage``) and its fleet worker processes;
* **cloud**: the stack's broker, Redis, bridges and the pipeline with its
  workers (reaped ones included, so a killed pipeline worker is still charged).
"""

from __future__ import annotations

import resource
from dataclasses import dataclass, field

from testrig.procstat import process_cpu_s
from testrig.services import child_pids

from .stack import Stack


def self_cpu_s() -> float:
    """This process's user + system CPU seconds (all its threads)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def cloud_cpu_s(stack: Stack) -> dict[str, float]:
    """CPU seconds so far of each part of the stack."""
    pipeline = stack.pipeline.pid
    workers = child_pids(pipeline) if pipeline is not None else []
    return {
        "broker": process_cpu_s(stack.broker.pid),
        "redis": process_cpu_s(stack.redis.pid),
        "bridge": sum(process_cpu_s(b.pid) for b in stack.bridges),
        "pipeline": process_cpu_s(pipeline) + sum(process_cpu_s(p) for p in workers),
    }


@dataclass(frozen=True)
class CpuReading:
    """CPU seconds at one moment: the generator's and each cloud part's."""

    generator_s: float
    cloud_s: dict[str, float] = field(default_factory=dict)


def read(stack: Stack | None, worker_pids: list[int]) -> CpuReading:
    """The generator's CPU (this process and ``worker_pids``) and the stack's, now."""
    generator = self_cpu_s() + sum(process_cpu_s(p, children=False) for p in worker_pids)
    return CpuReading(generator, cloud_cpu_s(stack) if stack is not None else {})


@dataclass(frozen=True)
class CpuUse:
    """CPU seconds spent between two readings, over ``wall_s`` seconds."""

    wall_s: float
    generator_s: float
    cloud_s: dict[str, float]

    @classmethod
    def between(cls, before: CpuReading, after: CpuReading, wall_s: float) -> CpuUse:
        cloud = {k: max(0.0, v - before.cloud_s.get(k, 0.0)) for k, v in after.cloud_s.items()}
        return cls(wall_s, max(0.0, after.generator_s - before.generator_s), cloud)

    def per_order_us(self, seconds: float, orders: int) -> float:
        """Microseconds of CPU per order."""
        return seconds / orders * 1e6 if orders else 0.0

    def cores(self, seconds: float) -> float:
        """Mean cores busy over the window."""
        return seconds / self.wall_s if self.wall_s > 0 else 0.0
