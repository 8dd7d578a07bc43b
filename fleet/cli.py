"""`fleet-sim`: the device-fleet load test and the local stack (`provision`: use order-enrol)."""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Sequence

from enrolment.cli import main as enrol_main
from schemas.names import DEFAULT_SHARDS
from servicekit.credentials import secret_flags
from servicekit.errors import ConfigError
from servicekit.logs import configure_logging
from servicekit.version import add_version_argument
from testrig.errors import ServerError

from .errors import FleetError
from .geo.runner import add_region_arguments, run_geo_load, run_geo_stack
from .runner import add_load_arguments, add_stack_arguments, run_load, run_stack

DEPRECATED_PROVISION = "fleet-sim provision is deprecated: use order-enrol (same arguments)"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the load test, or dispatch `fleet-sim stack` / `fleet-sim provision …`."""
    args_in = list(sys.argv[1:] if argv is None else argv)
    if args_in[:1] == ["provision"]:
        print(DEPRECATED_PROVISION, file=sys.stderr)
        return enrol_main(args_in[1:], prog="fleet-sim provision")
    parser = argparse.ArgumentParser(prog="fleet-sim", description=__doc__)
    add_version_argument(parser)
    add_load_arguments(parser)
    add_region_arguments(parser, load=True)
    parser.add_argument(
        "--log-level",
        default="error",
        help="level of the JSON log on stderr: debug, info, warning or error; info to follow "
        "the run (default %(default)s)",
    )
    commands = parser.add_subparsers(dest="command")
    commands.add_parser("provision", help="deprecated alias of order-enrol", add_help=False)
    stack = commands.add_parser("stack", help="start a local stack and keep it up")
    stack.add_argument(
        "--shards",
        type=int,
        default=DEFAULT_SHARDS,
        help="order streams of the stack's bridges and workers (default %(default)s)",
    )
    add_stack_arguments(stack)
    add_region_arguments(stack, load=False)
    args = parser.parse_args(args_in)
    if args.command == "provision":
        parser.error("`provision` must come first; better, use order-enrol")
    configure_logging(args.log_level, service="fleet-sim")
    if leaked := secret_flags(vars(args), ()):
        print(
            f"fleet-sim: warning: {', '.join(leaked)} carry a password that every local user "
            "can read (ps); use --mqtt-password-file / --redis-password-file",
            file=sys.stderr,
        )
    # SIGTERM unwinds like Ctrl-C, so the stack we started is stopped, not orphaned.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    if args.command == "stack":
        return run_geo_stack(args) if args.regions else run_stack(args)
    try:
        return run_geo_load(args) if args.regions else run_load(args)
    except (FleetError, ServerError) as exc:
        print(f"fleet-sim: {exc}", file=sys.stderr)
        return 2
    except ConfigError as exc:
        print(f"fleet-sim: {exc.detail}", file=sys.stderr)
        return 2


def _exit_on_sigterm(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    sys.exit(main())
