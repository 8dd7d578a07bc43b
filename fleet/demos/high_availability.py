"""`make demo-ha`: one region with no single broker or Redis to lose (issue 24).

A local stack with two brokers (devices spread over them by hashed list order),
a Redis master with two replicas and three Sentinels (``--redis-replicas 2``; the
bridges wait for one replica per batch), two bridge replicas and the pipeline;
``fleet-sim`` with 1,000 real edge agents for 60 s at 200 orders/s; broker 0's
host lost for good at 15 s (its devices move to broker 1), the Redis master
SIGKILLed at 20 s (a replica promoted, the old node back as a replica) and the
new master frozen for 5 s at 40 s (promoted past, then demoted); then the
verification (0 lost, 0 duplicated, 0 stuck). Extra flags go to ``fleet-sim``
(``--devices 100``).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from ..cli import main as fleet_sim

HA_ARGS = (
    "--devices", "1000", "--rate", "200", "--duration", "60", "--bridges", "2",
    "--brokers", "2", "--redis-replicas", "2",
    "--chaos", "15:broker-host-down=0,20:redis-failover,40:redis-freeze=5",
)  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    """Run the HA demo (later flags override the demo's)."""
    return fleet_sim([*HA_ARGS, *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
