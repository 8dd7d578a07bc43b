"""`order-bridge`: the cloud bridge. Not implemented yet (issue 4); this stub only parses flags."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the contract's flags, then refuse to run: the service is not built yet."""
    parser = argparse.ArgumentParser(
        prog="order-bridge", description="the cloud bridge (not implemented yet)"
    )
    parser.add_argument("--mqtt-url")
    parser.add_argument("--redis-url")
    parser.add_argument("--shards")
    parser.add_argument("--client-id")
    parser.add_argument("--http-port")
    parser.parse_args(argv)
    print("order-bridge: not implemented yet (see issue 4); nothing was started", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
