"""docs/how-to/rotate-broker-certificate.md, run as written while agents place orders."""

from __future__ import annotations

import asyncio
import re
import ssl
from pathlib import Path

from tests.bridge.conftest import BridgeProcess
from tests.helpers import wait_until
from tests.tools import require_tool

from .conftest import LOAD_DEVICES, RATE_PER_S
from .load import Load
from .rig import Rig
from .runbook import Runbook

_LOST = re.compile(r"^bridge_mqtt_connections_lost_total (\S+)$", re.MULTILINE)


def _served_der(rig: Rig) -> bytes:
    """The certificate a new TLS connection to the broker is given (DER), verified."""
    pem = ssl.get_server_certificate(
        ("localhost", rig.broker.port), ca_certs=str(rig.secure.conf_dir / "ca.crt")
    )
    return ssl.PEM_cert_to_DER_cert(pem)


def _file_der(path: Path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(path.read_text())


def _connections_lost(bridge: BridgeProcess) -> float:
    match = _LOST.search(bridge.metrics())
    assert match is not None
    return float(match[1])


async def test_rotate_broker_certificate_under_load(rig: Rig, tmp_path: Path) -> None:
    """SIGHUP with a new certificate from the same CA: same broker process, nobody
    disconnected, new connections get the new certificate, every order lands once."""
    require_tool("openssl")
    runbook = Runbook.load("rotate-broker-certificate.md")
    env = rig.env()
    cert = rig.secure.conf_dir / "server.crt"
    old_der = _file_der(cert)
    assert _served_der(rig) == old_der
    pid = rig.broker.pid
    async with Load([rig.device_config(d) for d in LOAD_DEVICES], RATE_PER_S) as load:
        load.start()
        await wait_until(lambda: load.connected() == len(LOAD_DEVICES), 60, "the load connected")
        connects = {d: load.connects(d) for d in LOAD_DEVICES}
        lost_before = [_connections_lost(b) for b in rig.bridges]
        for block in ("issue", "check-new", "install", "check-served"):
            await runbook.run(block, env, tmp_path)
        await asyncio.sleep(1.0)  # orders keep flowing over the sessions from before
        verdict = await load.settle(rig.admin_url(), shards=rig.shards)
        assert {d: load.connects(d) for d in LOAD_DEVICES} == connects
    assert [_connections_lost(b) for b in rig.bridges] == lost_before
    assert rig.broker.pid == pid
    new_der = _file_der(cert)
    assert new_der != old_der
    assert _served_der(rig) == new_der
    assert verdict.checked > 20
    assert (len(verdict.lost), len(verdict.duplicated), len(verdict.stuck)) == (0, 0, 0)
    assert verdict.ok, verdict
    assert runbook.unrun() == []
