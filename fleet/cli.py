"""`fleet-sim`: the device-fleet load test. Not implemented yet (issue 6): parses flags only."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the contract's flags, then refuse to run: the service is not built yet."""
    parser = argparse.ArgumentParser(
        prog="fleet-sim", description="the device-fleet load test (not implemented yet)"
    )
    parser.add_argument("--devices")
    parser.add_argument("--rate")
    parser.add_argument("--duration")
    parser.add_argument("--mqtt-url")
    parser.add_argument("--redis-url")
    parser.parse_args(argv)
    print("fleet-sim: not implemented yet (see issue 6); nothing was started", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
