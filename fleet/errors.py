"""Errors of the fleet simulator.

Hierarchy::

    FleetError          root: the simulator cannot run as asked
    └── ChaosError      a chaos schedule that is malformed or needs what we lack

(``testrig.errors.ServerError``, a server that did not come up, is the test rig's:
the test fixtures use it without the simulator.)
"""

from __future__ import annotations


class FleetError(RuntimeError):
    """The simulator cannot run as asked."""


class ChaosError(FleetError):
    """A malformed chaos schedule, or a fault this setup cannot inject."""
