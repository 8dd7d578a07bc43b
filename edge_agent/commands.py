"""Device commands from the cloud: ``retry_held`` releases held orders without a hand on the device.

The agent subscribes (QoS 1) to its own ``v1/devices/{device_id}/cmd`` and to
the fleet-wide ``v1/fleet/cmd``; on the secure broker only the pipeline's
service account may publish there (``enrolment/dynsec.py``). A message is
decoded on the event loop as it arrives; the work runs in :meth:`Commands.run`,
one of the agent's background loops, so a slow disk never stalls the MQTT
callbacks.

Every command is idempotent and safe to receive twice. A ``retry_held`` only
raises a flag: any number of them before the loop runs cost one release. An id
already carried out (a QoS 1 redelivery, a replay) is ignored, so it cannot
release orders held since. A command this agent does not know, or a payload
that does not decode, is logged, counted and ignored.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Final

import structlog

from schemas import RETRY_HELD, DecodeError, decode_command, names
from servicekit.backoff import Backoff
from servicekit.logs import truncate

from ._records import RetryResult
from .errors import StorageError
from .metrics import AgentMetrics

log = structlog.get_logger(__name__)

# Command ids remembered to ignore repeats; a command older than this many others
# would only release again what is held then, which is harmless too.
REMEMBERED_IDS: Final = 256


class Commands:
    """Takes command messages from the publisher's connection; run :meth:`run` as a task.

    Args:
        device_id: whose ``cmd`` topic to listen on.
        metrics: ``edge_commands{outcome}`` counts every message.
        release: re-queues every held order (the agent's ``retry_held``).
        retry_s: first wait before a release the outbox refused is tried again.
    """

    def __init__(
        self,
        device_id: str,
        metrics: AgentMetrics,
        release: Callable[[], Awaitable[RetryResult]],
        *,
        retry_s: float = 1.0,
    ) -> None:
        self.topics: Final = (names.command_topic(device_id), names.FLEET_COMMAND_TOPIC)
        self._metrics = metrics
        self._release = release
        self._retry = Backoff(retry_s, max(retry_s, 60.0))
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._release_due = asyncio.Event()

    def on_message(self, topic: str, payload: bytes) -> None:
        """One message on a command topic (event loop thread); never raises."""
        try:
            command = decode_command(payload)
        except DecodeError as exc:
            self._metrics.commands.labels("invalid").inc()
            log.warning(
                "invalid_command", topic=topic, reason=exc.reason, payload=truncate(payload)
            )
            return
        if command.id in self._seen:
            self._metrics.commands.labels("duplicate").inc()
            log.info("command_repeated_ignored", cmd=command.cmd, command_id=command.id)
            return
        self._seen[command.id] = None
        if len(self._seen) > REMEMBERED_IDS:
            self._seen.popitem(last=False)
        if command.cmd != RETRY_HELD:
            self._metrics.commands.labels("unknown").inc()
            log.warning("unknown_command_ignored", cmd=command.cmd, command_id=command.id)
            return
        self._metrics.commands.labels(RETRY_HELD).inc()
        log.info(
            "command_received",
            cmd=command.cmd,
            command_id=command.id,
            issued_at=command.issued_at,
            fleet=topic == names.FLEET_COMMAND_TOPIC,
        )
        self._release_due.set()

    async def run(self) -> None:
        """Release held orders whenever a ``retry_held`` came; retry while the outbox refuses."""
        while True:
            await self._release_due.wait()
            self._release_due.clear()
            try:
                result = await self._release()
            except StorageError as exc:
                # The outbox cannot be written now: keep the request and try again.
                log.error("remote_retry_held_failed", reason=exc.reason, detail=exc.detail)  # noqa: TRY400
                self._release_due.set()
                await self._retry.wait()
                continue
            self._retry.reset()
            log.info(
                "remote_retry_held_done",
                requeued=len(result.requeued),
                past_horizon=len(result.past_horizon),
            )
