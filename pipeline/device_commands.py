"""Send device commands: what ``order-pipeline devices retry-held`` runs.

A :class:`schemas.Command` goes out at QoS 1, not retained, with the
pipeline's MQTT account (on the secure broker the only account allowed to
publish commands), to ``v1/devices/{id}/cmd`` for each named device, or once
to ``v1/fleet/cmd`` for every device. Why one fleet topic rather than a loop
over the devices fleet health knows: every agent subscribes to it, so it
reaches devices that never reported health or whose health has aged out, it
costs one message for any fleet size, and a device that is offline but keeps
its persistent session gets it queued by the broker, as a per-device command is.

The PUBACK says how far each command got. ``0``: the broker took it for at
least one subscribed session (a device offline within its session expiry gets
it when it reconnects). ``16`` (no matching subscribers): no session listens,
so the device is unknown, its session expired, or its agent predates commands.
``135`` (not authorized): the account may not publish commands.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Literal

from schemas import Command, encode, names
from servicekit.backoff import Backoff
from servicekit.clock import now_ms
from servicekit.mqtt import DROPPED, MqttClient
from servicekit.urls import MqttUrl

NO_MATCHING_SUBSCRIBERS: Final = 0x10
NO_ANSWER: Final = DROPPED  # no PUBACK in time (or dropped unsent)

Outcome = Literal["delivered", "no_subscriber", "refused", "no_answer"]


@dataclass(frozen=True)
class Sent:
    """One command and what the broker answered: ``target`` is a device id or ``*``."""

    target: str
    topic: str
    command_id: str
    code: int

    @property
    def outcome(self) -> Outcome:
        """``delivered`` (PUBACK 0), ``no_subscriber`` (16), ``refused`` (≥128), ``no_answer``."""
        if self.code == 0:
            return "delivered"
        if self.code == NO_MATCHING_SUBSCRIBERS:
            return "no_subscriber"
        if self.code >= 0x80:
            return "refused"
        return "no_answer"


def new_command_id() -> str:
    """Time-ordered and unique: 12 hex digits of ms, then 48 random bits."""
    return f"{now_ms():012x}{secrets.token_hex(6)}"


def targets_of(device_ids: Sequence[str] | None) -> list[tuple[str, str]]:
    """``(target, topic)`` per command: each device's own topic, or the fleet's (None)."""
    if device_ids is None:
        return [("*", names.FLEET_COMMAND_TOPIC)]
    return [(device_id, names.command_topic(device_id)) for device_id in device_ids]


async def send_command(
    mqtt_url: str,
    cmd: str,
    device_ids: Sequence[str] | None,
    *,
    ca_file: str = "",
    timeout_s: float = 10.0,
) -> list[Sent] | None:
    """Publish ``cmd`` to each device (None: the whole fleet); None if the broker is unreachable.

    Each target gets a command with its own id, so a device's log names the
    command it carried out. Waits at most ``timeout_s`` to connect and as long
    again for the PUBACKs; a command unanswered by then is ``no_answer``.
    """
    client = MqttClient(
        MqttUrl.parse(mqtt_url),
        # A fresh session each run: nothing queued for a previous run may resurface.
        client_id=f"pipeline-cmd-{secrets.token_hex(4)}",
        clean_start=True,
        session_expiry_s=0,
        backoff=Backoff(0.1, 1.0),
        connect_wait_s=timeout_s,
        ca_file=ca_file,
        name="pipeline-cmd",
    )
    async with client:
        if not client.connected:
            return None
        sends = []
        for target, topic in targets_of(device_ids):
            command = Command(v=1, cmd=cmd, id=new_command_id(), issued_at=now_ms())
            sends.append((target, topic, command.id, client.publish_acked(topic, encode(command))))
        if not sends:
            return []
        done, _ = await asyncio.wait([ack for *_, ack in sends], timeout=timeout_s)
        return [
            Sent(target, topic, command_id, ack.result() if ack in done else NO_ANSWER)
            for target, topic, command_id, ack in sends
        ]
