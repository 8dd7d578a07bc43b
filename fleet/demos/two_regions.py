"""`make demo-geo`: two regions, a region outage and a partition, then the geo verdict.

Starts the geo rig (:mod:`fleet.geo.stack`: per region Mosquitto, Redis with
the shipped redis.conf, order-bridge, order-pipeline), homes 40 real edge
agents half in ``eu``, half in ``us``, and places 40 orders/s for 45 s while

* at 8 s region ``eu`` goes down (broker, Redis and bridge SIGKILLed) for 10 s:
  its devices fail over to ``us``, orders in doubt at ``eu`` wait;
* at 26 s ``eu`` and ``us`` are partitioned for 8 s (the bridges' cross-region
  Redis connections blackholed): local orders flow, cross-region retries
  get ``pending``.

Then it waits for quiescence and verifies across both regions: 0 lost,
0 duplicated (ever), 0 stuck, every entry in its order's authority region.
Exit status 0 only if that holds. Extra flags go to ``fleet-sim``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from ..cli import main as fleet_sim

DEMO_ARGS = (
    "--regions", "2", "--devices", "40", "--rate", "40", "--duration", "45",
    "--chaos", "8:region-down=eu/10,26:region-partition=eu|us/8", "--no-live",
)  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    """Run the geo demo; later flags override the demo's."""
    args = list(sys.argv[1:] if argv is None else argv)
    return fleet_sim([*DEMO_ARGS, *args])


if __name__ == "__main__":
    raise SystemExit(main())
