"""The fleet simulator (``fleet-sim``): real edge agents under load and chaos, and its demos.

``fleet-sim`` (fleet.cli) drives :func:`run` with :class:`SimOptions` against a
:class:`Stack` it starts itself, or against URLs; see docs/tutorials/first-load-test.md
and docs/reference/fleet-sim.md. The servers, the power-cut filesystem and the proxy it
starts come from :mod:`testrig`; enrolment is :mod:`enrolment` (``order-enrol``).

Modules by job:

* the run: ``sim`` (one run), ``devices`` (simulated agents), ``light``
  (lightweight devices: the agent's MQTT behaviour, one outbox per process),
  ``load`` (the offered orders and the waits that end a run), ``workers``
  (devices over several processes), ``tracker`` (what the devices saw),
  ``cpu`` (what the generator and the stack spent), ``looplag`` (the simulator's own
  event-loop lag);
* the stack: ``stack`` (a local single-region stack), ``runner`` and ``cli``
  (the command line);
* chaos: ``chaos`` (the schedule), ``clockskew``, ``rogue``;
* the verdict: ``verify``, ``statuses``;
* the report: ``report``, ``svg``, ``live``;
* ``geo/``: the same across regions; ``demos/``: the ``make demo*`` targets.
"""

from .errors import ChaosError, FleetError
from .sim import SimOptions, SimResult, run
from .stack import Stack, StackSettings
from .verify import Verdict, verify

__all__ = [
    "ChaosError",
    "FleetError",
    "SimOptions",
    "SimResult",
    "Stack",
    "StackSettings",
    "Verdict",
    "run",
    "verify",
]
