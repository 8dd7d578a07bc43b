"""`make demo` and `make stack`.

``make demo``: a local stack on free ports (Mosquitto, Redis, two bridge
replicas, the pipeline with the demo catalog), then ``fleet-sim`` with 1,000
real edge agents for 60 s at 200 orders/s, the broker SIGKILLed and restarted
at 20 s and a bridge SIGKILLed and restarted at 40 s; then the verification
(0 lost, 0 duplicated), the summary and the HTML report's path. Everything it
started is stopped at the end. Extra flags go to ``fleet-sim`` (``--rate 100``).

``make demo-scale`` (``--scale``): 10,000 devices spread over 2 worker
processes, 50 orders/s for 120 s, the offered rate ×10 for 30 s at 20 s
(``spike``) and the broker restarted with every device connected at 90 s
(``storm``); then the same verification (0 lost, 0 duplicated, 0 stuck).
9,000 of the devices are lightweight devices (``--light-devices``: the same
MQTT behaviour without an agent each), since the point is 10,000 sessions and
their reconnect storm; the 1,000 real agents keep the agent itself in the
run. About 3 minutes on a quiet 2-core machine.

``make stack`` (``--stack-only``): the same stack, kept up until Ctrl-C.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from ..cli import main as fleet_sim

DEMO_ARGS = (
    "--devices", "1000", "--rate", "200", "--duration", "60", "--bridges", "2",
    "--chaos", "20:broker-restart,40:bridge-kill",
)  # fmt: skip


SCALE_ARGS = (
    "--devices", "10000", "--light-devices", "9000", "--processes", "2", "--rate", "50",
    "--duration", "120", "--bridges", "2", "--workers", "2", "--ramp", "2000",
    "--poll-interval", "5",
    "--settle-timeout", "900", "--status-wait", "120", "--status-query-delay", "45",
    "--chaos", "20:spike=10x:30s,90:storm",
)  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo (later flags override the demo's), the scale demo with --scale,
    or keep the stack up with --stack-only."""
    args = list(sys.argv[1:] if argv is None else argv)
    if "--stack-only" in args:
        args.remove("--stack-only")
        return fleet_sim(["stack", *args])
    if "--scale" in args:
        args.remove("--scale")
        return fleet_sim([*SCALE_ARGS, *args])
    return fleet_sim([*DEMO_ARGS, *args])


if __name__ == "__main__":
    raise SystemExit(main())
