"""`order-pipeline`: workers and orders API. Not implemented yet (issue 5): parses flags only."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the contract's flags, then refuse to run: the service is not built yet."""
    parser = argparse.ArgumentParser(
        prog="order-pipeline",
        description="pipeline workers and the orders API (not implemented yet)",
    )
    parser.add_argument("--mqtt-url")
    parser.add_argument("--redis-url")
    parser.add_argument("--http-port")
    parser.parse_args(argv)
    print("order-pipeline: not implemented yet (see issue 5); nothing was started", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
