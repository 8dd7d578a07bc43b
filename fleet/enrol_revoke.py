"""The ``enrol-revoke=N`` chaos kind: devices enrolled and revoked live during a run.

On a stack whose broker runs the dynamic-security plugin (``StackSettings(dynsec=
True)``), the injector:

1. enrols N new device accounts through the control API (``enrolment.control``,
   what ``order-enrol … --live`` does) and starts an agent for each, which the
   load then offers orders like any other device;
2. after :data:`SERVE_S`, takes half of them out of service: no new orders,
   and it waits until their outboxes are empty and every order of theirs has
   its terminal status heard (the runbook's drain, docs/how-to/enrol-devices.md);
3. revokes those accounts live, measures how long until their sessions ended,
   and waits until each one's agent has been refused at a reconnect; then
   stops those agents.

Every order the revoked devices took stays in the run's tracker, so the
verifier accounts for each one (in the streams once, ended, heard).
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from enrolment.control import Control, enrol_device, revoke_device
from enrolment.dynsec import device_client_id
from servicekit.urls import MqttUrl

from .devices import Fleet, SimDevice
from .errors import ChaosError
from .tracker import Tracker

if TYPE_CHECKING:
    from .chaos import ChaosEvent, ChaosRunner

SERVE_S = 2.0  # how long the enrolled devices take orders before half are revoked
CONNECT_TIMEOUT_S = 30.0
DRAIN_TIMEOUT_S = 60.0
REFUSED_TIMEOUT_S = 10.0
POLL_S = 0.01


@dataclass
class EnrolRevokeReport:
    """What one ``enrol-revoke`` did."""

    at_s: float
    enrolled: list[str]
    revoked: list[str]
    # Seconds from sending the revocation until the last revoked session had ended.
    ended_s: float | None = None
    # Revoked devices whose agent was refused at a reconnect afterwards.
    refused: int = 0
    # Orders the revoked devices took (all of them checked by the verifier).
    orders_of_revoked: int = 0
    drained: bool = False


async def inject(runner: ChaosRunner, event: ChaosEvent, n: int) -> str:
    """Enrol ``event.arg`` devices live, let them serve, drain and revoke half."""
    stack = runner.stack
    fleet = runner.fleet
    if stack is None or not stack.settings.dynsec:
        raise ChaosError("enrol-revoke needs a stack with StackSettings(dynsec=True)")
    if not isinstance(fleet, Fleet):  # refused earlier: the kind is single_process
        raise ChaosError("enrol-revoke needs the devices in this process (--processes 1)")
    count = max(2, int(event.arg))
    ids = [f"{runner.prefix}-live{n}-{i}" for i in range(count)]
    passwords = {device_id: secrets.token_urlsafe(18) for device_id in ids}
    control_url = MqttUrl.parse(stack.mqtt_url)

    def enrol() -> None:
        with Control(control_url, stack.admin_password) as control:
            for device_id in ids:
                enrol_device(control, device_id, passwords[device_id])

    report = EnrolRevokeReport(time.monotonic() - runner.started, ids, ids[: count // 2])
    runner.log.enrol_revoke.append(report)
    await asyncio.to_thread(enrol)
    devices = []
    for device_id in ids:
        url = _with_account(runner.mqtt_url, device_id, passwords[device_id])
        devices.append(await fleet.add_device(device_id, url, device_client_id(device_id)))
    await _until(lambda: all(d.agent.publisher.connected for d in devices), CONNECT_TIMEOUT_S)
    await asyncio.sleep(SERVE_S)
    victims = devices[: count // 2]
    for device in victims:
        fleet.retire(device)
    tracker = fleet.tracker
    report.drained = await _until(lambda: _drained(tracker, victims), DRAIN_TIMEOUT_S)
    revoked = set(report.revoked)
    report.orders_of_revoked = sum(1 for ref in tracker.accepted if ref[0] in revoked)

    def revoke() -> None:
        with Control(control_url, stack.admin_password) as control:
            for device in victims:
                revoke_device(control, device.device_id)

    failures = [_failures(d) for d in victims]
    sent = time.monotonic()
    await asyncio.to_thread(revoke)
    if await _until(lambda: not any(d.agent.publisher.connected for d in victims), 5.0):
        report.ended_s = time.monotonic() - sent
    await _until(
        lambda: all(_failures(d) > f for d, f in zip(victims, failures, strict=True)),
        REFUSED_TIMEOUT_S,
    )
    report.refused = sum(
        1
        for d, f in zip(victims, failures, strict=True)
        if _failures(d) > f and not d.agent.publisher.connected
    )
    for device in victims:
        await fleet.stop_device(device)
    ended = "not ended!" if report.ended_s is None else f"ended in {report.ended_s:.2f} s"
    return (
        f" ({count} enrolled live, {len(victims)} drained and revoked: sessions {ended}, "
        f"{report.refused} refused at reconnect, {report.orders_of_revoked} orders of theirs)"
    )


def _with_account(url: str, username: str, password: str) -> str:
    """``url`` (the devices' broker URL) logged in as ``username``."""
    parsed = MqttUrl.parse(url)
    scheme = "mqtts" if parsed.tls else "mqtt"
    return f"{scheme}://{username}:{password}@{parsed.host}:{parsed.port}"


def _drained(tracker: Tracker, devices: list[SimDevice]) -> bool:
    """Nothing unreceipted in their outboxes and every order of theirs heard as ended."""
    if any(d.agent.outbox.store.pending_rows for d in devices):
        return False
    ids = {d.device_id for d in devices}
    return all(ref in tracker.terminal for ref in tracker.accepted if ref[0] in ids)


def _failures(device: SimDevice) -> float:
    """Refused or failed connection attempts of ``device``'s agent so far."""
    registry = device.agent.metrics.registry
    return registry.get_sample_value("edge_mqtt_connect_failures_total") or 0.0


async def _until(check: Callable[[], bool], timeout_s: float) -> bool:
    """Poll ``check`` until true or ``timeout_s`` passes; whether it became true."""
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(POLL_S)
    return True
