"""mosquitto/secure.conf and mosquitto/acl, run by a real Mosquitto with test-made certificates.

Nobody may publish as another device: each device reaches only its own topics.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Callable
from pathlib import Path

import pytest

from fleet.pki import create_ca
from fleet.servers import MosquittoProcess, free_port
from schemas.names import orders_topic, receipts_topic, shared_orders_subscription

from .conftest import PASSWORDS, REPO, SecureBroker, probe
from .mqtt_probe import Probe

NOT_AUTHORIZED = 135


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

    Mosquitto 2.0 grants the SUBSCRIBE and enforces the ACL on delivery.
    """
    with probe(secure_broker, "kiosk-a", PASSWORDS["kiosk-a"]) as device:
        device.subscribe(receipts_topic("kiosk-b"))
        device.subscribe(receipts_topic("kiosk-a"))
        with probe(secure_broker, "bridge", PASSWORDS["bridge"]) as bridge:
            assert bridge.publish(receipts_topic("kiosk-b"), b"for b") == 0
            assert bridge.publish(receipts_topic("kiosk-a"), b"for a") == 0
        device.wait_messages(2, timeout_s=1.0)
    assert [m.payload for m in device.messages] == [b"for a"]


def test_devices_cannot_write_receipts(secure_broker: SecureBroker) -> None:
    """Only the bridge may publish receipts: a device forging one is refused."""
    with probe(secure_broker, "kiosk-a", PASSWORDS["kiosk-a"]) as device:
        assert device.publish(receipts_topic("kiosk-a"), b"forged") == NOT_AUTHORIZED


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
    client = Probe(secure_broker.server.port, "kiosk-a", PASSWORDS["kiosk-a"])
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
