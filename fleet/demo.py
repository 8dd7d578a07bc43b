"""`make demo` and `make stack`.

``make demo``: a local stack on free ports (Mosquitto, Redis, two bridge
replicas, the pipeline with the demo catalog), then ``fleet-sim`` with 1,000
real edge agents for 60 s at 200 orders/s, the broker SIGKILLed and restarted
at 20 s and a bridge SIGKILLed and restarted at 40 s; then the verification
(0 lost, 0 duplicated), the summary and the HTML report's path. Everything it
started is stopped at the end. Extra flags go to ``fleet-sim`` (``--rate 100``).

``make stack`` (``--stack-only``): the same stack, kept up until Ctrl-C.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from .cli import main as fleet_sim

DEMO_ARGS = (
    "--devices", "1000", "--rate", "200", "--duration", "60", "--bridges", "2",
    "--chaos", "20:broker-restart,40:bridge-kill",
)  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo (later flags override the demo's), or keep the stack up with --stack-only."""
    args = list(sys.argv[1:] if argv is None else argv)
    if "--stack-only" in args:
        args.remove("--stack-only")
        return fleet_sim(["stack", *args])
    return fleet_sim([*DEMO_ARGS, *args])


if __name__ == "__main__":
    raise SystemExit(main())
