"""`order-enrol`: enrolled devices connect to the secure broker, revoked ones cannot,
and no id escapes `registry/devices/<id>/`."""

from __future__ import annotations

import os
import subprocess
import tomllib
from pathlib import Path

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge_agent.config import AgentConfig
from enrolment.audit import audit
from enrolment.cli import main
from enrolment.dynsec import Accounts, device_client_id, verify_password
from enrolment.files import file_mode
from enrolment.provision import ProvisionError, Registry
from fleet.cli import DEPRECATED_PROVISION
from fleet.cli import main as fleet_sim
from schemas.ids import is_device_id
from schemas.messages import DeviceId
from schemas.names import orders_topic
from servicekit.urls import MqttUrl
from testrig.services import console_script

from ..fleet.mqtt_probe import Probe
from .conftest import SecureBroker

ESCAPES = ["..", ".", "/etc", "../x", "a/b", "a\\b", "kiosk\n", "kiosk\x00", " kiosk", ""]
RESERVED = ["bridge", "pipeline", "Bridge", "PIPELINE", "bRiDgE", "bridge\n", "admin", "default"]


def device_probe(broker: SecureBroker, directory: Path) -> Probe:
    """A client set up from nothing but an enrolled device's files."""
    settings = tomllib.loads((directory / "agent.toml").read_text())
    url = MqttUrl.parse(settings["mqtt_url"])
    assert url.tls
    return Probe(
        broker.server.port, url.username, url.password, ca_file=directory / "ca.crt",
        client_cert=(directory / "client.crt", directory / "client.key"),
        client_id=settings["client_id"],
    )  # fmt: skip


def snapshot(root: Path) -> dict[str, tuple[int, bytes]]:
    """Every file under ``root`` with its mode and content."""
    return {
        str(p.relative_to(root)): (file_mode(p), p.read_bytes())
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    """A registry with two enrolled devices, a service account and a dev CA."""
    reg = Registry(tmp_path / "registry")
    reg.enrol(
        ["kiosk-1", "kiosk-2"], broker_url="mqtts://b:8883", ca=reg.dev_ca(), client_certs=True
    )
    reg.add_service("bridge")
    return reg


def test_enrolled_device_connects_and_revoked_device_is_refused(
    secure_broker: SecureBroker,
) -> None:
    """Enrol → restart → connect with password, client cert and bound client id; revoke +
    restart → refused. The plugin reads its file at start only."""
    registry = Registry(secure_broker.conf_dir)
    [enrolment] = registry.enrol(
        ["kiosk-new"], broker_url="mqtts://localhost:8883", ca=secure_broker.ca,
        client_certs=True,
    )  # fmt: skip
    assert file_mode(enrolment.directory / "agent.toml") == 0o600
    secure_broker.server.restart()
    with device_probe(secure_broker, enrolment.directory) as device:
        assert device.connack == 0
        assert device.publish(orders_topic("kiosk-new"), b"hello") < 128  # 16: no subscribers
    assert registry.revoke(["kiosk-new"]) == ["kiosk-new"]
    accounts = Accounts.load(registry.accounts_path)
    assert "kiosk-new" not in accounts.clients
    assert "kiosk-a" in accounts.clients, "other accounts are kept"
    assert not enrolment.directory.exists()
    secure_broker.server.restart()
    probe = Probe(
        secure_broker.server.port, "kiosk-new", enrolment.password,
        ca_file=secure_broker.ca.cert, client_id=device_client_id("kiosk-new"),
    )  # fmt: skip
    with probe as device:
        assert device.connack is not None
        assert device.connack.is_failure


def test_agent_toml_is_a_valid_agent_config_with_the_bound_client_id(registry: Registry) -> None:
    """The agent reads agent.toml as is, and connects with the client id the broker binds."""
    text = (registry.devices_dir / "kiosk-1" / "agent.toml").read_text()
    config = AgentConfig(**tomllib.loads(text))
    assert config.mqtt_client_id == device_client_id("kiosk-1")
    assert AgentConfig(device_id="kiosk-1").mqtt_client_id == device_client_id("kiosk-1")
    password = MqttUrl.parse(config.mqtt_url).password
    assert password is not None
    assert verify_password(Accounts.load(registry.accounts_path).clients["kiosk-1"], password)


@pytest.mark.parametrize("device_id", [*RESERVED, *ESCAPES, "x" * 65, "kiosk/../../x"])
def test_reserved_and_invalid_ids_are_refused(tmp_path: Path, device_id: str) -> None:
    """Service names in any letter case and ids outside the contract's rule (whole-string
    match) are never enrolled, and nothing is written."""
    with pytest.raises(ProvisionError):
        Registry(tmp_path).enrol([device_id], broker_url="mqtts://h:8883")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("device_id", ESCAPES + RESERVED)
def test_revoke_never_deletes_outside_a_device_folder(registry: Registry, device_id: str) -> None:
    """`revoke ..` once deleted the whole registry and `revoke .` every device: now refused,
    and every file is still there."""
    before = snapshot(registry.root)
    with pytest.raises(ProvisionError):
        registry.revoke(["kiosk-1", device_id])
    assert snapshot(registry.root) == before


def test_cli_refuses_escapes_with_exit_2_and_writes_nothing(
    registry: Registry, capsys: pytest.CaptureFixture[str]
) -> None:
    """`devices ..`, `devices $'bridge\\n'`, `revoke ..`, `revoke .` exit 2 and change nothing."""
    root = str(registry.root)
    before = snapshot(registry.root)
    for argv in (
        ["devices", "..", "--broker", "mqtts://b:8883"],
        ["devices", "bridge\n", "--broker", "mqtts://b:8883"],
        ["devices", "ok-1", "Pipeline", "--broker", "mqtts://b:8883"],
        ["revoke", ".."],
        ["revoke", "."],
    ):
        assert main(["--registry", root, *argv]) == 2, argv
    assert snapshot(registry.root) == before
    assert "invalid device id" in capsys.readouterr().err


def test_modes_are_right_on_every_write_including_re_enrolment(registry: Registry) -> None:
    """Secrets are 0600 and folders 0700 after enrolment, and a loosened file is reset
    by re-enrolling (it once stayed 0644)."""
    device = registry.devices_dir / "kiosk-1"
    for path in (device / "agent.toml", device / "client.key"):
        path.chmod(0o644)
    registry.accounts_path.chmod(0o644)
    device.chmod(0o755)
    old = os.umask(0)  # even a careless umask does not loosen what we write
    try:
        registry.enrol(
            ["kiosk-1"], broker_url="mqtts://b:8883", ca=registry.dev_ca(), client_certs=True
        )
    finally:
        os.umask(old)
    expected = {
        registry.accounts_path: 0o600,
        registry.ca_dir / "ca.key": 0o600,
        registry.ca_dir: 0o700,
        device: 0o700,
        device / "agent.toml": 0o600,
        device / "client.key": 0o600,
        device / "client.crt": 0o644,
        device / "ca.crt": 0o644,
    }
    assert {path: file_mode(path) for path in expected} == expected
    assert audit(registry) == []


def test_under_umask_000_the_root_is_0700_and_check_fails_on_writable_paths(
    tmp_path: Path,
) -> None:
    """`order-enrol` run under umask 000 leaves no path group- or world-writable (the root
    was once 0777), and `check` fails on any that another hand loosened."""
    root = tmp_path / "registry"
    enrol = console_script("order-enrol")

    def under_umask_000(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["sh", "-c", 'umask 000 && exec "$@"', "sh", enrol, "--registry", str(root), *argv],
            capture_output=True, text=True, check=False, timeout=60,
        )  # fmt: skip

    done = under_umask_000("devices", "kiosk-1", "--broker", "mqtts://b:8883", "--dev-ca")
    assert done.returncode == 0, done.stderr
    assert under_umask_000("service", "bridge").returncode == 0
    assert file_mode(root) == 0o700
    loose = [p for p in [root, *root.rglob("*")] if file_mode(p) & 0o022]
    assert loose == []
    assert under_umask_000("check").returncode == 0

    root.chmod(0o777)
    (root / "devices").chmod(0o757)
    (root / "ca" / "ca.crt").chmod(0o666)
    checked = under_umask_000("check")
    assert checked.returncode == 1
    assert f"{root}: mode 0777 is writable by group or others" in checked.stdout
    assert f"{root / 'devices'}: mode 0757 is writable by group or others" in checked.stdout
    assert f"{root / 'ca' / 'ca.crt'}: mode 0666 is writable by group or others" in checked.stdout
    assert under_umask_000("service", "pipeline").returncode == 0
    assert file_mode(root) == 0o700  # the next write takes the root back


def test_check_reports_modes_orphans_and_accounts(
    registry: Registry, capsys: pytest.CaptureFixture[str]
) -> None:
    """`order-enrol check`: a loose secret, a folder without account, an account without
    folder, an unbound device and a widened service role are all reported (exit 1)."""
    root = str(registry.root)
    assert main(["--registry", root, "check"]) == 0
    (registry.devices_dir / "kiosk-1" / "agent.toml").chmod(0o644)
    (registry.devices_dir / "stray").mkdir(mode=0o700)
    (registry.devices_dir / "stray" / "agent.toml").touch(mode=0o600)
    accounts = Accounts.load(registry.accounts_path)
    accounts.set_device("ghost", "pw")
    accounts.clients["kiosk-2"] = msgspec.structs.replace(
        accounts.clients["kiosk-2"], clientid=None
    )
    accounts.save(registry.accounts_path)
    widened = msgspec.json.decode(registry.accounts_path.read_bytes())
    for role in widened["roles"]:
        if role["rolename"] == "bridge":
            role["acls"].append({"acltype": "subscribePattern", "topic": "#", "allow": True})
    registry.accounts_path.write_bytes(msgspec.json.encode(widened))
    capsys.readouterr()
    assert main(["--registry", root, "check"]) == 1
    out = capsys.readouterr().out
    assert "kiosk-1/agent.toml: mode 0644" in out
    assert "stray: folder without an account" in out
    assert "account 'ghost' has no folder" in out
    assert "device 'kiosk-2' is not bound to its client id" in out
    assert "service 'bridge' rights differ from the policy" in out


def test_cli_enrols_a_numbered_fleet_with_a_dev_ca(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`order-enrol devices --count` writes one config and client cert per device."""
    argv = [
        *("--registry", str(tmp_path), "devices", "--count", "3"),
        *("--prefix", "kiosk-", "--broker", "mqtts://b:8883", "--dev-ca", "--client-certs"),
    ]
    assert main(argv) == 0
    accounts = Accounts.load(tmp_path / "dynamic-security.json")
    assert sorted(accounts.devices()) == ["kiosk-0001", "kiosk-0002", "kiosk-0003"]
    assert (tmp_path / "devices/kiosk-0003/client.crt").exists()
    assert "enrolled 3 devices" in capsys.readouterr().out
    assert main(["--registry", str(tmp_path), "revoke", "nobody"]) == 1
    assert main(["--registry", str(tmp_path), "check"]) == 0


def test_fleet_sim_provision_is_a_deprecated_alias_of_order_enrol(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`fleet-sim provision …` still enrols, and says once on stderr to use order-enrol."""
    argv = ["--registry", str(tmp_path), "devices", "kiosk-1", "--broker", "mqtts://b:8883"]
    assert fleet_sim(["provision", *argv]) == 0
    out, err = capsys.readouterr()
    assert "enrolled 1 devices" in out
    assert err.splitlines() == [DEPRECATED_PROVISION]
    assert "order-enrol" in DEPRECATED_PROVISION
    assert sorted(Accounts.load(tmp_path / "dynamic-security.json").devices()) == ["kiosk-1"]
    assert fleet_sim(["provision", *argv[:2], "revoke", ".."]) == 2
    assert "fleet-sim provision: invalid device id" in capsys.readouterr().err


@given(st.text(st.sampled_from("aZ09_.-/\n\r\x00 é+#$"), max_size=66))
def test_device_id_check_is_the_contracts_rule_matched_whole(value: str) -> None:
    """`is_device_id` (provisioning, the bridge's topic check) accepts only what the
    contract's DeviceId accepts, and refuses any trailing newline."""
    try:
        msgspec.convert(value, DeviceId)
    except msgspec.ValidationError:
        contract = False
    else:
        contract = True
    if is_device_id(value):
        assert contract
    else:
        # Until schemas patterns end in a real end-of-string, `$` lets "x\n" through.
        assert not contract or value.endswith("\n")


def test_a_broken_accounts_file_is_a_clear_error(
    registry: Registry, capsys: pytest.CaptureFixture[str]
) -> None:
    """An accounts file we cannot read stops `devices` with exit 2 and a message, and
    `check` reports it; nothing is overwritten."""
    registry.accounts_path.write_text('{"clients": [{"username": 1}]}')
    before = snapshot(registry.root)
    argv = ["--registry", str(registry.root)]
    assert main([*argv, "devices", "kiosk-3", "--broker", "mqtts://b:8883"]) == 2
    assert "is not an accounts file" in capsys.readouterr().err
    assert snapshot(registry.root) == before
    assert main([*argv, "check"]) == 1
    assert "dynamic-security.json: unreadable" in capsys.readouterr().out


def test_rights_bring_accounts_of_an_older_release_up_to_date(
    registry: Registry, capsys: pytest.CaptureFixture[str]
) -> None:
    """Accounts written before device commands lack their rights: `check` says so, and
    `rights` rewrites every role to the policy with passwords and client ids unchanged."""
    root = str(registry.root)
    registry.add_service("pipeline")
    older = msgspec.json.decode(registry.accounts_path.read_bytes())
    for role in older["roles"]:
        role["acls"] = [acl for acl in role["acls"] if "cmd" not in acl["topic"]]
    registry.accounts_path.write_bytes(msgspec.json.encode(older))
    clients = Accounts.load(registry.accounts_path).clients
    capsys.readouterr()
    assert main(["--registry", root, "check"]) == 1
    out = capsys.readouterr().out
    for account in ("device 'kiosk-1'", "device 'kiosk-2'", "service 'pipeline'"):
        assert f"{account} rights differ from the policy" in out
    assert main(["--registry", root, "rights"]) == 0
    assert "rights of 4 accounts rewritten" in capsys.readouterr().out
    assert main(["--registry", root, "check"]) == 0
    assert Accounts.load(registry.accounts_path).clients == clients
    assert file_mode(registry.accounts_path) == 0o600


def test_rights_without_an_accounts_file_exit_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Nothing to update is an error, and no file is created."""
    assert main(["--registry", str(tmp_path), "rights"]) == 1
    assert "no accounts" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
