"""Fleet simulator, chaos, verification and the local stack runner.

``fleet-sim`` (fleet.cli) drives :func:`run` with :class:`SimOptions` against a
:class:`Stack` it starts itself, or against URLs; see the README's
"Load-testing a fleet".
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
