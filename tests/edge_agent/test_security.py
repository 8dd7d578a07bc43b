"""Security: TLS with a client certificate, username/password, and no secret in the logs."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from edge_agent import AgentConfig, EdgeAgent
from testrig.servers import MosquittoProcess, free_port
from tests.helpers import wait_until

from .bridge_double import BridgeDouble
from .conftest import order_body

PASSWORD = "s3cret-pw-7781"


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    """A throwaway CA, a server certificate for 127.0.0.1 and a client certificate."""
    d = tmp_path / "pki"
    d.mkdir()
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=test-ca",
             "-keyout", "ca.key", "-out", "ca.pem", cwd=d)  # fmt: skip
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    for name, ext in (("server", ["-extfile", "san.ext"]), ("client", [])):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
                 "-keyout", f"{name}.key", "-out", f"{name}.csr", cwd=d)  # fmt: skip
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                 "-CAcreateserial", "-days", "2", "-out", f"{name}.pem", *ext, cwd=d)  # fmt: skip
    return d


@pytest.fixture
def secure_broker(
    pki: Path, tmp_path: Path, mosquitto_factory: Callable[..., MosquittoProcess]
) -> tuple[MosquittoProcess, int]:
    """A broker with a password file and a TLS listener that requires client certificates."""
    passwd = tmp_path / "passwd"
    passwd.touch()
    subprocess.run(["mosquitto_passwd", "-b", str(passwd), "kiosk", PASSWORD], check=True)
    tls_port = free_port()
    conf = "\n".join([
        f"password_file {passwd}",
        f"listener {tls_port} 127.0.0.1",
        f"cafile {pki / 'ca.pem'}",
        f"certfile {pki / 'server.pem'}",
        f"keyfile {pki / 'server.key'}",
        "require_certificate true",
    ])  # fmt: skip
    return mosquitto_factory(extra_conf=conf), tls_port


async def test_tls_client_cert_and_password(
    pki: Path, secure_broker: tuple[MosquittoProcess, int], make_config: Callable[..., AgentConfig]
) -> None:
    """Over mqtts with a client certificate and a password, orders still settle by receipt."""
    broker, tls_port = secure_broker
    config = make_config(
        mqtt_url=f"mqtts://kiosk:{PASSWORD}@127.0.0.1:{tls_port}",
        ca_file=str(pki / "ca.pem"),
        cert_file=str(pki / "client.pem"),
        key_file=str(pki / "client.key"),
        http_enabled=False,
    )
    with BridgeDouble(broker.url), capture_logs() as logs:
        async with EdgeAgent(config) as agent:
            await agent.submit(order_body("tls-000001"))

            async def settled() -> bool:
                rec = await agent.get("tls-000001")
                return rec is not None and rec.state == "accepted"

            await wait_until(settled, 20, "settled over TLS")
    assert any(entry["event"] == "mqtt_connected" for entry in logs)
    assert PASSWORD not in json.dumps(logs, default=str)


async def test_wrong_password_is_reported_and_not_logged(
    secure_broker: tuple[MosquittoProcess, int], make_config: Callable[..., AgentConfig]
) -> None:
    """A refused login shows in health as a broker error; the password appears in no log line."""
    broker, _ = secure_broker
    wrong = "wrong-pw-123456"
    config = make_config(mqtt_url=f"mqtt://kiosk:{wrong}@127.0.0.1:{broker.port}")
    with capture_logs() as logs:
        async with EdgeAgent(config) as agent:

            async def refused() -> bool:
                return agent.publisher.last_error is not None

            await wait_until(refused, 20, "connect refused")
            health = await agent.health()
    assert not health.broker_connected
    assert health.broker_error is not None
    assert "connect_refused" in json.dumps(logs, default=str) or "CONNACK" in health.broker_error
    assert wrong not in json.dumps(logs, default=str)
    assert wrong not in health.broker_error
