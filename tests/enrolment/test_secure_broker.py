"""mosquitto/secure.conf and the provisioned accounts, run by a real Mosquitto with test-made
certificates.

Nobody may publish as another device, read another device's messages, join a
service's shared subscription, or take over another client's session.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from enrolment.dynsec import device_client_id, health_topic
from enrolment.files import file_mode
from enrolment.pki import create_ca
from schemas.names import (
    FLEET_COMMAND_TOPIC,
    command_topic,
    orders_topic,
    receipts_topic,
    shared_orders_subscription,
    shared_status_query_subscription,
    status_query_topic,
    status_topic,
)
from testrig.servers import MosquittoProcess, find_binary, free_port, port_is_open
from tests.tools import require

from ..fleet.mqtt_probe import Probe
from .conftest import (
    DEVICES,
    PASSWORDS,
    REPO,
    SecureBroker,
    dynsec_plugin,
    probe,
    write_accounts,
)

NOT_AUTHORIZED = 135


def _has_user(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


SHARED_HEALTH = "$share/pipeline/v1/devices/+/health"


def test_device_cannot_publish_as_another_device(secure_broker: SecureBroker) -> None:
    """kiosk-a's publish to kiosk-b's orders topic is refused (135) and never delivered."""
    with probe(secure_broker, "bridge", PASSWORDS["bridge"]) as bridge:
        assert bridge.subscribe(shared_orders_subscription("bridge")).value < 128
        with probe(secure_broker, "kiosk-a", PASSWORDS["kiosk-a"]) as device:
            assert device.publish(orders_topic("kiosk-b"), b"spoof") == NOT_AUTHORIZED
            assert device.publish(orders_topic("kiosk-a"), b"own") == 0
        delivered = bridge.wait_messages(1)
    assert [(m.topic, m.payload) for m in delivered] == [(orders_topic("kiosk-a"), b"own")]


def test_device_reads_only_its_own_topics(secure_broker: SecureBroker) -> None:
    """kiosk-a never receives kiosk-b's receipts, even subscribed to them.

    The broker refuses the SUBSCRIBE, and would not deliver even if it had granted it.
    """
    with probe(secure_broker, "kiosk-a", PASSWORDS["kiosk-a"]) as device:
        assert device.subscribe(receipts_topic("kiosk-b")) == NOT_AUTHORIZED
        assert device.subscribe(receipts_topic("kiosk-a")).value < 128
        with probe(secure_broker, "bridge", PASSWORDS["bridge"]) as bridge:
            assert bridge.publish(receipts_topic("kiosk-b"), b"for b") < 128  # 16: no subscriber
            assert bridge.publish(receipts_topic("kiosk-a"), b"for a") == 0
        device.wait_messages(2, timeout_s=1.0)
    assert [m.payload for m in device.messages] == [b"for a"]


def test_devices_cannot_write_receipts(secure_broker: SecureBroker) -> None:
    """Only the bridge may publish receipts: a device forging one is refused."""
    with probe(secure_broker, "kiosk-a", PASSWORDS["kiosk-a"]) as device:
        assert device.publish(receipts_topic("kiosk-a"), b"forged") == NOT_AUTHORIZED


def test_shared_subscription_theft_is_refused(secure_broker: SecureBroker) -> None:
    """A device may not join the bridge's share group: refused, and the bridge gets every order."""
    with probe(secure_broker, "bridge", PASSWORDS["bridge"], "bridge-1") as bridge:
        assert bridge.subscribe(shared_orders_subscription("bridge")).value < 128
        with probe(secure_broker, "kiosk-a", PASSWORDS["kiosk-a"]) as thief:
            for group in ("bridge", "pipeline", "thief"):
                assert thief.subscribe(shared_orders_subscription(group)) == NOT_AUTHORIZED
            with probe(secure_broker, "kiosk-b", PASSWORDS["kiosk-b"]) as victim:
                for i in range(40):
                    assert victim.publish(orders_topic("kiosk-b"), b"order-%d" % i) == 0
                delivered = bridge.wait_messages(40, timeout_s=10)
            time.sleep(0.2)
            assert thief.messages == []
    assert sorted(m.payload for m in delivered) == sorted(b"order-%d" % i for i in range(40))


def test_a_device_cannot_open_more_sessions_under_other_client_ids(
    secure_broker: SecureBroker,
) -> None:
    """Each device account is bound to one client id: any other id is refused at CONNECT."""
    for client_id in ("thief-1", "edge-kiosk-b", "bridge-1", ""):
        with probe(secure_broker, "kiosk-a", PASSWORDS["kiosk-a"], client_id) as other:
            assert other.connack == NOT_AUTHORIZED, client_id


@pytest.mark.parametrize("victim", ["kiosk-b", "bridge"])
def test_session_takeover_is_refused(secure_broker: SecureBroker, victim: str) -> None:
    """kiosk-a connecting with another client's id is refused; that client stays connected."""
    victim_id = device_client_id(victim) if victim.startswith("kiosk") else "bridge-1"
    with probe(secure_broker, victim, PASSWORDS[victim], victim_id) as target:
        assert target.connack == 0
        with probe(secure_broker, "kiosk-a", PASSWORDS["kiosk-a"], victim_id) as thief:
            assert thief.connack == NOT_AUTHORIZED
        time.sleep(0.3)
        assert not target.disconnected.is_set()
        topic = orders_topic(victim) if victim != "bridge" else receipts_topic("kiosk-b")
        assert target.publish(topic, b"still here") < 128  # answered: still connected


@pytest.mark.parametrize(
    "topic_filter",
    [
        "#",
        "v1/#",
        "v1/devices/+/receipts",
        "v1/devices/+/#",
        "+/devices/kiosk-a/receipts",
        "v1/devices/kiosk-b/receipts",
        "v1/devices/kiosk-b/#",
        "$share/g/v1/devices/kiosk-a/receipts",
        "$share/g/v1/devices/kiosk-a/#",
        "$SYS/#",
        "$CONTROL/dynamic-security/#",
        "v1/devices/kiosk-b/cmd",
        "v1/fleet/#",
        "v1/fleet/+",
        "$share/g/v1/fleet/cmd",
    ],
)
def test_device_subscriptions_beyond_its_subtree_are_refused(
    secure_broker: SecureBroker, topic_filter: str
) -> None:
    """SUBSCRIBE outside v1/devices/<own id>/, or through $share, gets 135."""
    with probe(secure_broker, "kiosk-a", PASSWORDS["kiosk-a"]) as device:
        assert device.subscribe(topic_filter) == NOT_AUTHORIZED


@pytest.mark.parametrize(
    "topic_filter",
    ["v1/devices/kiosk-a/receipts", "v1/devices/kiosk-a/status", "v1/devices/kiosk-a/+",
     "v1/devices/kiosk-a/#", "v1/devices/kiosk-a/cmd", "v1/fleet/cmd"],
)  # fmt: skip
def test_device_subscriptions_inside_its_subtree_are_granted(
    secure_broker: SecureBroker, topic_filter: str
) -> None:
    """The agent's own filters (and wildcards within its subtree) are granted."""
    with probe(secure_broker, "kiosk-a", PASSWORDS["kiosk-a"]) as device:
        assert device.subscribe(topic_filter).value < 128


@pytest.mark.parametrize(
    ("user", "topic_filter", "granted"),
    [
        ("bridge", shared_orders_subscription("bridge"), True),
        ("bridge", shared_status_query_subscription("pipeline"), False),
        ("bridge", "v1/devices/+/orders", False),
        ("bridge", "#", False),
        ("pipeline", shared_status_query_subscription("pipeline"), True),
        ("pipeline", SHARED_HEALTH, True),
        ("pipeline", shared_orders_subscription("bridge"), False),
        ("pipeline", "v1/devices/+/status-query", False),
    ],
)
def test_services_hold_exactly_their_shared_subscriptions(
    secure_broker: SecureBroker, user: str, topic_filter: str, granted: bool
) -> None:
    """Only bridge (orders) and pipeline (status queries, health) may subscribe, through $share."""
    with probe(secure_broker, user, PASSWORDS[user], f"{user}-1") as service:
        code = service.subscribe(topic_filter).value
    assert (code < 128) is granted, code


def test_status_query_status_and_health_paths_work(secure_broker: SecureBroker) -> None:
    """Device → pipeline: status-query and health; pipeline → device: status. Nothing else."""
    with (
        probe(secure_broker, "pipeline", PASSWORDS["pipeline"], "pipeline-1") as pipeline,
        probe(secure_broker, "kiosk-a", PASSWORDS["kiosk-a"]) as device,
    ):
        assert pipeline.subscribe(shared_status_query_subscription("pipeline")).value < 128
        assert pipeline.subscribe(SHARED_HEALTH).value < 128
        assert device.subscribe(status_topic("kiosk-a")).value < 128
        assert device.publish(status_query_topic("kiosk-a"), b"query") == 0
        assert device.publish(health_topic("kiosk-a"), b"health") == 0
        assert device.publish(status_query_topic("kiosk-b"), b"spoof") == NOT_AUTHORIZED
        assert device.publish(health_topic("kiosk-b"), b"spoof") == NOT_AUTHORIZED
        assert device.publish(status_topic("kiosk-a"), b"forged") == NOT_AUTHORIZED
        got = pipeline.wait_messages(2)
        assert sorted((m.topic, m.payload) for m in got) == [
            (health_topic("kiosk-a"), b"health"),
            (status_query_topic("kiosk-a"), b"query"),
        ]
        assert pipeline.publish(status_topic("kiosk-a"), b"confirmed") == 0
        assert pipeline.publish(orders_topic("kiosk-a"), b"forged order") == NOT_AUTHORIZED
        assert [m.payload for m in device.wait_messages(1)] == [b"confirmed"]


def test_only_the_pipeline_may_publish_device_commands(secure_broker: SecureBroker) -> None:
    """A device's command to itself, to another device or to the fleet is refused (135) and
    never delivered, nor is the bridge's; the pipeline's reach their devices."""
    with contextlib.ExitStack() as stack:
        a, b = (stack.enter_context(probe(secure_broker, d, PASSWORDS[d])) for d in DEVICES)
        bridge = stack.enter_context(probe(secure_broker, "bridge", PASSWORDS["bridge"], "b-1"))
        pipeline = stack.enter_context(
            probe(secure_broker, "pipeline", PASSWORDS["pipeline"], "pipeline-1")
        )
        for device, name in ((a, "kiosk-a"), (b, "kiosk-b")):
            assert device.subscribe(command_topic(name)).value < 128
            assert device.subscribe(FLEET_COMMAND_TOPIC).value < 128
        topics = (command_topic("kiosk-a"), command_topic("kiosk-b"), FLEET_COMMAND_TOPIC)
        refused = {
            (sender, topic): client.publish(topic, f"forged by {sender}".encode())
            for sender, client in (("kiosk-a", a), ("kiosk-b", b), ("bridge", bridge))
            for topic in topics
        }
        assert set(refused.values()) == {NOT_AUTHORIZED}, refused
        assert pipeline.publish(command_topic("kiosk-a"), b"for a") == 0
        assert pipeline.publish(FLEET_COMMAND_TOPIC, b"for all") == 0
        a.wait_messages(2)
        b.wait_messages(1)
        time.sleep(0.2)  # any forged command would have arrived before the pipeline's
    assert [(m.topic, m.payload) for m in a.messages] == [
        (command_topic("kiosk-a"), b"for a"),
        (FLEET_COMMAND_TOPIC, b"for all"),
    ]
    assert [(m.topic, m.payload) for m in b.messages] == [(FLEET_COMMAND_TOPIC, b"for all")]


def test_a_device_will_is_delivered_only_on_its_own_health_topic(
    secure_broker: SecureBroker,
) -> None:
    """The agent's Will (its health topic) passes the ACL; a Will naming another device's
    topic never reaches the pipeline. Mosquitto 2.0 accepts that CONNECT and drops the Will."""
    with probe(secure_broker, "pipeline", PASSWORDS["pipeline"], "pipeline-1") as pipeline:
        assert pipeline.subscribe(SHARED_HEALTH).value < 128
        connacks = []
        for topic in (health_topic("kiosk-b"), health_topic("kiosk-a")):
            device = probe(secure_broker, "kiosk-a", PASSWORDS["kiosk-a"])
            device.client.will_set(topic, b"will on " + topic.encode(), qos=1)
            with contextlib.ExitStack() as stack:
                stack.enter_context(device)
                connacks.append(device.connack)
                # Vanish without DISCONNECT: the broker must publish the Will.
                device.client.loop_stop()
                sock = device.client.socket()
                assert sock is not None
                sock.close()
                stack.pop_all()
            device.client._reset_sockets()
        got = pipeline.wait_messages(2, timeout_s=2.0)
    assert [code.value if code is not None else None for code in connacks] == [0, 0]
    assert [(m.topic, m.payload) for m in got] == [
        (health_topic("kiosk-a"), b"will on v1/devices/kiosk-a/health")
    ], connacks


def test_acl_file_alone_cannot_refuse_shared_subscriptions(
    tmp_path: Path, mosquitto_factory: Callable[..., MosquittoProcess]
) -> None:
    """Why secure.conf uses the plugin: with password_file + acl_file (and even
    use_username_as_clientid), Mosquitto 2.0 grants a device `$share/bridge/…`
    and the bridge loses half of another device's orders."""
    passwd = tmp_path / "passwd"
    passwd.touch()
    for user in ("kiosk-a", "kiosk-b", "bridge"):
        subprocess.run(
            [find_binary("mosquitto_passwd"), "-b", str(passwd), user, PASSWORDS[user]],
            check=True,
        )
    acl = tmp_path / "acl"
    acl.write_text(
        "user bridge\ntopic read v1/devices/+/orders\n"
        "pattern write v1/devices/%u/orders\npattern read v1/devices/%u/#\n"
    )
    port = free_port()
    server = mosquitto_factory(
        port=port,
        config=f"listener {port} 127.0.0.1\nallow_anonymous false\npassword_file {passwd}\n"
        f"acl_file {acl}\nuse_username_as_clientid true\n",
    )
    with Probe(server.port, "bridge", PASSWORDS["bridge"]) as bridge:
        bridge.subscribe(shared_orders_subscription("bridge"))
        with Probe(server.port, "kiosk-a", PASSWORDS["kiosk-a"]) as thief:
            assert thief.subscribe(shared_orders_subscription("bridge")).value < 128
            with Probe(server.port, "kiosk-b", PASSWORDS["kiosk-b"]) as victim:
                for i in range(20):
                    victim.publish(orders_topic("kiosk-b"), b"%d" % i)
                got = bridge.wait_messages(20, timeout_s=2)
    assert len(got) < 20, "Mosquitto now refuses $share theft without the plugin"
    assert thief.messages == []


@pytest.mark.parametrize(("user", "password"), [(None, None), ("kiosk-a", "wrong")])
def test_clients_without_valid_credentials_are_refused(
    secure_broker: SecureBroker, user: str | None, password: str | None
) -> None:
    """Anonymous clients and wrong passwords get a failing CONNACK."""
    with probe(secure_broker, user, password) as client:
        assert client.connack is not None
        assert client.connack.is_failure


def test_tls_with_the_wrong_ca_fails_with_a_clear_error(
    secure_broker: SecureBroker, tmp_path: Path
) -> None:
    """A client trusting another CA refuses the broker's certificate at the handshake."""
    other_ca = create_ca(tmp_path / "other", name="someone else's CA")
    context = ssl.create_default_context(cafile=str(other_ca.cert))
    with (
        pytest.raises(ssl.SSLCertVerificationError, match="certificate verify failed"),
        socket.create_connection(("127.0.0.1", secure_broker.server.port), 5) as sock,
        context.wrap_socket(sock, server_hostname="localhost"),
    ):
        pass
    # The right CA passes the same handshake, so the failure above is the CA's.
    context = ssl.create_default_context(cafile=str(secure_broker.ca.cert))
    with (
        socket.create_connection(("127.0.0.1", secure_broker.server.port), 5) as sock,
        context.wrap_socket(sock, server_hostname="localhost") as tls,
    ):
        assert tls.version() in {"TLSv1.2", "TLSv1.3"}


def test_plain_tcp_is_not_served(secure_broker: SecureBroker) -> None:
    """The production listener speaks TLS only: a plaintext client never gets a CONNACK."""
    client = Probe(
        secure_broker.server.port, "kiosk-a", PASSWORDS["kiosk-a"],
        client_id=device_client_id("kiosk-a"),
    )  # fmt: skip
    with client:
        assert client.connack is None or client.connack.is_failure


def test_dev_conf_starts_and_matches_the_harness_limits(
    mosquitto_factory: Callable[..., MosquittoProcess],
) -> None:
    """mosquitto/dev.conf is valid, and the test harness uses the same limits."""
    port = free_port()
    dev = (REPO / "mosquitto/dev.conf").read_text().replace("1883", str(port))
    server = mosquitto_factory(port=port, config=dev)
    assert server.running
    harness = " ".join(MosquittoProcess(server.workdir / "h").command())
    generated = (server.workdir / "h" / "mosquitto.conf").read_text()
    assert harness
    for line in dev.splitlines():
        if line.startswith("max_"):
            assert line in generated


def test_broker_started_as_root_reads_accounts_only_when_user_mosquitto_may() -> None:
    """Started as root, Mosquitto drops to `mosquitto` before the plugin reads its file:
    a root-owned 0600 file leaves a running broker that refuses everyone; chown fixes it."""
    require(os.geteuid() == 0, "needs root: the broker must start as root to drop privileges")
    require(_has_user("mosquitto"), "needs a `mosquitto` user (the mosquitto package adds it)")
    plugin = dynsec_plugin()
    directory = Path(tempfile.mkdtemp(prefix="broker-owner-"))
    try:
        directory.chmod(0o755)
        write_accounts(directory)
        accounts = directory / "dynamic-security.json"
        assert (file_mode(accounts), accounts.stat().st_uid) == (0o600, 0)
        port = free_port()
        conf = directory / "mosquitto.conf"
        conf.write_text(
            f"user mosquitto\nlistener {port} 127.0.0.1\nallow_anonymous false\n"
            f"plugin {plugin}\nplugin_opt_config_file {accounts}\n"
        )
        with _root_broker(conf, port) as log:
            with probe_plain(port, "kiosk-a") as device:
                assert device.connack == NOT_AUTHORIZED
            assert "File is not readable" in log.read_text()
        shutil.chown(accounts, user="mosquitto")
        with _root_broker(conf, port), probe_plain(port, "kiosk-a") as device:
            assert device.connack == 0
    finally:
        shutil.rmtree(directory)


@contextlib.contextmanager
def _root_broker(conf: Path, port: int) -> Iterator[Path]:
    log = conf.with_suffix(".log")
    with log.open("wb") as out:
        process = subprocess.Popen(
            [find_binary("mosquitto"), "-c", str(conf)], stdout=out, stderr=out
        )
    try:
        deadline = time.monotonic() + 10
        while not port_is_open(port) and time.monotonic() < deadline:
            assert process.poll() is None, log.read_text()
            time.sleep(0.02)
        yield log
    finally:
        process.terminate()
        process.wait(10)


def probe_plain(port: int, user: str) -> Probe:
    """A plaintext client for one of the fixture's devices, with its bound client id."""
    return Probe(port, user, PASSWORDS[user], client_id=device_client_id(user))
