"""`fleet-sim`: the device-fleet load test, the local stack, and device provisioning."""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from schemas.names import DEFAULT_SHARDS
from servicekit.logs import configure_logging

from .audit import audit
from .errors import FleetError
from .geo_runner import add_region_arguments, run_geo_load, run_geo_stack
from .pki import CertFiles
from .provision import DEFAULT_INSTALL_DIR, ProvisionError, Registry
from .runner import add_load_arguments, add_stack_arguments, run_load, run_stack
from .servers import ServerError


def main(argv: Sequence[str] | None = None) -> int:
    """Run the load test, or dispatch `fleet-sim stack` / `fleet-sim provision …`."""
    parser = argparse.ArgumentParser(prog="fleet-sim", description=__doc__)
    add_load_arguments(parser)
    add_region_arguments(parser, load=True)
    parser.add_argument(
        "--log-level",
        default="error",
        help="level of the JSON log on stderr: debug, info, warning or error; info to follow "
        "the run (default %(default)s)",
    )
    commands = parser.add_subparsers(dest="command")
    _add_provision(commands.add_parser("provision", help="enrol, revoke or audit devices"))
    stack = commands.add_parser("stack", help="start a local stack and keep it up")
    stack.add_argument(
        "--shards",
        type=int,
        default=DEFAULT_SHARDS,
        help="order streams of the stack's bridges and workers (default %(default)s)",
    )
    add_stack_arguments(stack)
    add_region_arguments(stack, load=False)
    args = parser.parse_args(argv)
    if args.command == "provision":
        try:
            return int(args.run(args))
        except ProvisionError as exc:
            print(f"fleet-sim provision: {exc}", file=sys.stderr)
            return 2
    configure_logging(args.log_level, service="fleet-sim")
    # SIGTERM unwinds like Ctrl-C, so the stack we started is stopped, not orphaned.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    if args.command == "stack":
        return run_geo_stack(args) if args.regions else run_stack(args)
    try:
        return run_geo_load(args) if args.regions else run_load(args)
    except (FleetError, ServerError) as exc:
        print(f"fleet-sim: {exc}", file=sys.stderr)
        return 2


def _exit_on_sigterm(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def _add_provision(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--registry",
        type=Path,
        required=True,
        help="registry directory that holds the broker accounts, the dev CA and each device's "
        "folder",
    )
    actions = parser.add_subparsers(dest="action", required=True)

    devices = actions.add_parser("devices", help="enrol devices (new passwords, agent.toml)")
    devices.add_argument(
        "device_ids",
        nargs="*",
        metavar="DEVICE_ID",
        help="ids of devices to enrol (again: a new password)",
    )
    devices.add_argument(
        "--count",
        type=int,
        default=0,
        help="also enrol this many devices named PREFIX0001, PREFIX0002, … (default %(default)s)",
    )
    devices.add_argument(
        "--prefix",
        default="device-",
        help="name prefix of the devices --count enrols (default %(default)s)",
    )
    devices.add_argument(
        "--broker",
        required=True,
        help="broker URL the agents connect to, written into their agent.toml, e.g. "
        "mqtts://host:8883",
    )
    ca = devices.add_mutually_exclusive_group()
    ca.add_argument(
        "--ca-file",
        type=Path,
        help="CA certificate the agents trust for an mqtts:// broker; its key (same name, "
        ".key) signs --client-certs",
    )
    ca.add_argument(
        "--dev-ca",
        action="store_true",
        help="use the registry's own dev CA, creating it on first use; for tests and demos, "
        "not production",
    )
    devices.add_argument(
        "--client-certs",
        action="store_true",
        help="also issue each device a client certificate (needs a CA with its key)",
    )
    devices.add_argument(
        "--install-dir",
        type=Path,
        default=DEFAULT_INSTALL_DIR,
        help="folder on the device that the files go to; agent.toml points there for "
        "certificates (default %(default)s)",
    )
    devices.set_defaults(run=_enrol)

    service = actions.add_parser("service", help="create a service account (bridge, pipeline)")
    service.add_argument("name", help="the service: bridge or pipeline (a new password each time)")
    service.set_defaults(run=_service)

    revoke = actions.add_parser("revoke", help="remove devices' credentials")
    revoke.add_argument(
        "device_ids",
        nargs="+",
        metavar="DEVICE_ID",
        help="ids of devices whose account and folder are removed",
    )
    revoke.set_defaults(run=_revoke)

    check = actions.add_parser("check", help="audit a registry: modes, orphans, accounts")
    check.set_defaults(run=_check)


def _enrol(args: argparse.Namespace) -> int:
    registry = Registry(args.registry)
    ids = [*args.device_ids, *(f"{args.prefix}{i:04d}" for i in range(1, args.count + 1))]
    if not ids:
        raise ProvisionError("name device ids or give --count")
    ca: CertFiles | None = None
    if args.dev_ca:
        ca = registry.dev_ca()
    elif args.ca_file:
        ca = CertFiles(args.ca_file, args.ca_file.with_suffix(".key"))
    enrolled = registry.enrol(
        ids, broker_url=args.broker, ca=ca, client_certs=args.client_certs,
        install_dir=args.install_dir,
    )  # fmt: skip
    print(f"enrolled {len(enrolled)} devices into {registry.devices_dir}")
    print(f"broker accounts: {registry.accounts_path} (restart the broker to apply)")
    return 0


def _service(args: argparse.Namespace) -> int:
    password = Registry(args.registry).add_service(args.name)
    print(f"{args.name} password (shown once): {password}")
    return 0


def _revoke(args: argparse.Namespace) -> int:
    registry = Registry(args.registry)
    revoked = registry.revoke(args.device_ids)
    unknown = sorted(set(args.device_ids) - set(revoked))
    print(f"revoked {len(revoked)} devices; restart the broker to apply")
    if unknown:
        print(f"not enrolled: {', '.join(unknown)}", file=sys.stderr)
        return 1
    return 0


def _check(args: argparse.Namespace) -> int:
    registry = Registry(args.registry)
    findings = audit(registry)
    for finding in findings:
        print(finding)
    if findings:
        print(f"{len(findings)} problems in {registry.root}", file=sys.stderr)
        return 1
    print(f"{registry.root}: consistent")
    return 0


if __name__ == "__main__":
    sys.exit(main())
