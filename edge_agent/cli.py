"""`edge-agent`: the device agent. Not implemented yet (issue 3); this stub only parses flags."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the contract's flags, then refuse to run: the service is not built yet."""
    parser = argparse.ArgumentParser(
        prog="edge-agent", description="the device agent (not implemented yet)"
    )
    parser.add_argument("--device-id")
    parser.add_argument("--mqtt-url")
    parser.add_argument("--db")
    parser.add_argument("--http-port")
    parser.parse_args(argv)
    print("edge-agent: not implemented yet (see issue 3); nothing was started", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
