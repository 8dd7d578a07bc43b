"""``order-enrol``: enrol, revoke and audit devices and service accounts; update their rights.

Exit codes: 0 done, 1 ``revoke`` named a device that was not enrolled,
``check`` found problems or ``rights`` found no accounts file, 2 refused (an
invalid or reserved id, a broken accounts file, ``--client-certs`` without a
CA key, or ``--live`` and the broker refused or did not answer).

Two accounts files, one writer each: ``registry/dynamic-security.json`` is
this tool's, the broker's copy is the plugin's (it saves it after every live
change). Every command writes the registry's file. With ``--live URL``,
``devices``, ``revoke`` and ``service`` also change the running broker through
the dynamic-security control API as the ``admin`` account, at once and without
a restart. Without it nothing reaches the broker: the registry's file is
copied to a stopped broker (bootstrap). ``rights`` is offline only.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Sequence
from pathlib import Path

from servicekit.urls import MqttUrl
from servicekit.version import add_version_argument

from .audit import audit
from .control import Control, enrol_device, revoke_device, set_service
from .pki import CertFiles
from .provision import DEFAULT_INSTALL_DIR, ProvisionError, Registry

PROG = "order-enrol"


def main(argv: Sequence[str] | None = None, *, prog: str = PROG) -> int:
    """Entry point of ``order-enrol`` (and of the deprecated ``fleet-sim provision``)."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    try:
        return int(args.run(args))
    except ProvisionError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    """The ``order-enrol`` parser: ``--registry`` and one action."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Write broker accounts, agent configs and certificates into a registry "
        "directory that the operator ships to the broker and the devices.",
    )
    add_version_argument(parser)
    parser.add_argument(
        "--registry",
        type=Path,
        required=True,
        help="registry directory holding dynamic-security.json, ca/ and devices/; created if "
        "missing, reused by every later enrolment (required)",
    )
    actions = parser.add_subparsers(dest="action", required=True)
    _add_devices(actions.add_parser("devices", help="enrol devices (new passwords, agent.toml)"))

    service = actions.add_parser(
        "service", help="create or reset a service account (bridge, pipeline, admin)"
    )
    service.add_argument(
        "name",
        help="the service account: bridge, pipeline or admin (the --live account); prints "
        "its new password once",
    )
    _add_live(service)
    service.set_defaults(run=_service)

    revoke = actions.add_parser("revoke", help="remove devices' accounts and folders")
    revoke.add_argument(
        "device_ids", nargs="+", metavar="DEVICE_ID", help="ids of enrolled devices to remove"
    )
    _add_live(revoke)
    revoke.set_defaults(run=_revoke)

    rights = actions.add_parser(
        "rights",
        help="rewrite every account's rights to this release's policy, passwords unchanged "
        "(after an upgrade that adds rights, such as device commands)",
    )
    rights.set_defaults(run=_rights)

    check = actions.add_parser("check", help="audit a registry: modes, orphans, accounts")
    check.set_defaults(run=_check)
    return parser


def _add_devices(devices: argparse.ArgumentParser) -> None:
    devices.add_argument(
        "device_ids",
        nargs="*",
        metavar="DEVICE_ID",
        help="ids to enrol (1-64 of [A-Za-z0-9_.-]); re-enrolling one gives it a new password",
    )
    devices.add_argument(
        "--count",
        type=int,
        default=0,
        help="also enrol PREFIX0001 … PREFIXnnnn, for a numbered fleet (default 0: none)",
    )
    devices.add_argument(
        "--prefix",
        default="device-",
        help="id prefix of the numbered devices --count makes (default %(default)s)",
    )
    devices.add_argument(
        "--broker",
        required=True,
        help="broker URL the agents connect to, written into agent.toml, e.g. "
        "mqtts://host:8883 (required)",
    )
    ca = devices.add_mutually_exclusive_group()
    ca.add_argument(
        "--ca-file",
        type=Path,
        help="PEM CA certificate the agents trust, copied to each device; its key (same name, "
        ".key) is needed only with --client-certs (default: none, the system trust store)",
    )
    ca.add_argument(
        "--dev-ca",
        action="store_true",
        help="use (or create) the registry's own dev CA in ca/; for tests and demos, not "
        "production (default off)",
    )
    devices.add_argument(
        "--client-certs",
        action="store_true",
        help="also issue each device a client certificate signed by the CA, for brokers that "
        "require one; needs the CA key (default off)",
    )
    devices.add_argument(
        "--install-dir",
        type=Path,
        default=DEFAULT_INSTALL_DIR,
        help="directory the device's files will be copied to; agent.toml names its "
        "certificates there (default %(default)s)",
    )
    _add_live(devices)
    devices.set_defaults(run=_enrol)


def _add_live(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--live",
        metavar="URL",
        help="also apply the change to the running broker at URL (mqtt[s]://host:port) "
        "through its dynamic-security control API, at once, with no restart (default: off, "
        "only the registry's dynamic-security.json changes)",
    )
    parser.add_argument(
        "--admin-password-file",
        type=Path,
        help="file holding the admin account's password (from `order-enrol service admin`); "
        "required with --live",
    )
    parser.add_argument(
        "--admin-ca-file",
        type=Path,
        help="PEM CA that signed the broker's certificate, for an mqtts:// --live URL "
        "(default: the system trust store)",
    )


def _control(args: argparse.Namespace) -> Control | None:
    if args.live is None:
        return None
    if args.admin_password_file is None:
        raise ProvisionError("--live needs --admin-password-file")
    password = args.admin_password_file.read_text().strip()
    return Control(MqttUrl.parse(args.live), password, ca_file=args.admin_ca_file)


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
    control = _control(args)
    with control or contextlib.nullcontext():  # an unreachable broker stops us before writing
        enrolled = registry.enrol(
            ids, broker_url=args.broker, ca=ca, client_certs=args.client_certs,
            install_dir=args.install_dir,
        )  # fmt: skip
        print(f"enrolled {len(enrolled)} devices into {registry.devices_dir}")
        if control is None:
            print(f"broker accounts: {registry.accounts_path} (copy it to a stopped broker)")
            return 0
        for enrolment in enrolled:
            enrol_device(control, enrolment.device_id, enrolment.password)
    print(f"applied live to {control.url}: the devices may connect now")
    return 0


def _service(args: argparse.Namespace) -> int:
    control = _control(args)
    with control or contextlib.nullcontext():
        password = Registry(args.registry).add_service(args.name)
        if control is not None:
            set_service(control, args.name, password)
    print(f"{args.name} password (shown once): {password}")
    return 0


def _revoke(args: argparse.Namespace) -> int:
    registry = Registry(args.registry)
    control = _control(args)
    live: list[str] = []
    if control is not None:
        for device_id in args.device_ids:
            registry.device_dir(device_id)  # refuse a bad id before the broker hears of it
        with control:
            live = [device_id for device_id in args.device_ids if revoke_device(control, device_id)]
        print(f"revoked {len(live)} devices live at {control.url}: their sessions are closed")
    revoked = registry.revoke(args.device_ids)
    print(f"revoked {len(revoked)} devices in {registry.accounts_path}")
    unknown = sorted(set(args.device_ids) - set(revoked) - set(live))
    if unknown:
        print(f"not enrolled: {', '.join(unknown)}", file=sys.stderr)
        return 1
    return 0


def _rights(args: argparse.Namespace) -> int:
    registry = Registry(args.registry)
    if not registry.accounts_path.exists():
        print(f"no accounts in {registry.root}", file=sys.stderr)
        return 1
    count = registry.refresh_rights()
    print(f"rights of {count} accounts rewritten in {registry.accounts_path}")
    print("copy it to the broker while the broker is stopped, then start it, to apply")
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
