"""What the Redis failover tests share: steady order load, and what came out of it.

:class:`Load` publishes orders over MQTT (QoS 1) from a thread at a steady rate and
keeps when each was published; :class:`Outcome` reads the receipts and the streams
after the promotion and says what a failover test asserts (lost, duplicated, resume
times). The services are real processes (``order-bridge``, ``order-pipeline run``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import PipelineConfig
from pipeline.names import TERMINAL_STATUSES, events_key, order_key
from schemas import encode
from schemas.names import orders_topic, stream_key
from servicekit.redis_clients import text
from testrig.servers import free_port
from testrig.services import child_pids
from tests.bridge.conftest import Publisher, ReceiptCollector
from tests.helpers import make_order
from tests.pipeline.processes import env_for, spawn

SHARDS = 4  # BridgeProcess runs --shards 4


class Load:
    """``rate`` orders per second over ``devices`` devices, from a thread, until :meth:`stop`."""

    def __init__(self, mqtt_url: str, *, devices: int = 20, rate: float = 100.0) -> None:
        self.publisher = Publisher(mqtt_url)
        self.devices = [f"ha-{index:02d}" for index in range(devices)]
        self.rate = rate
        self.published: dict[str, float] = {}  # order id -> monotonic publish time
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        seq = 0
        start = time.monotonic()
        while not self._stop.is_set():
            device = self.devices[seq % len(self.devices)]
            order = make_order(device, seq)
            self.publisher.publish(orders_topic(device), encode(order))
            with self._lock:
                self.published[order.order_id] = time.monotonic()
            seq += 1
            delay = start + seq / self.rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)

    def stop(self) -> None:
        """Stop publishing; wait until the broker holds every order."""
        self._stop.set()
        self._thread.join(10)
        self.publisher.wait_all()

    def after(self, moment: float) -> dict[str, float]:
        """The orders published after ``moment`` (monotonic)."""
        with self._lock:
            return {oid: at for oid, at in self.published.items() if at > moment}

    def close(self) -> None:
        self._stop.set()
        self.publisher.close()


def stream_order_ids(client: Any) -> Counter[str]:
    """How often each order id is in the shard streams (a sync client, single or cluster)."""
    counts: Counter[str] = Counter()
    for shard in range(SHARDS):
        rows: Any = client.xrange(stream_key(shard))
        counts.update(text(fields[b"order_id"]) for _, fields in rows)
    return counts


def accepted(receipts: ReceiptCollector) -> set[str]:
    """Order ids receipted ``accepted`` (or ``duplicate``: stored before) so far."""
    return {
        r.order_id
        for _d, r in receipts.snapshot()
        if r.order_id is not None and r.result in {"accepted", "duplicate"}
    }


def processed(client: Any, order_ids: Iterable[str]) -> set[str]:
    """The orders among ``order_ids`` whose record has a terminal status."""
    done = set()
    for order_id in order_ids:
        device = order_id.split("-", 1)[1].rsplit("-", 1)[0]
        status = client.hget(order_key(device, order_id, SHARDS), "status")
        if status is not None and text(status) in TERMINAL_STATUSES:
            done.add(order_id)
    return done


def worked_since(client: Any, wall_ms: int) -> bool:
    """A worker committed a step after ``wall_ms`` (an events entry newer than it, by its id)."""
    for shard in range(SHARDS):
        rows: Any = client.xrevrange(events_key(shard), count=1)
        if rows and int(text(rows[0][0]).split("-")[0]) > wall_ms:
            return True
    return False


def first_time(check: Callable[[], bool], timeout_s: float) -> float | None:
    """The monotonic time ``check`` first holds, polled every 20 ms; None on timeout."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return time.monotonic()
        time.sleep(0.02)
    return None


@dataclass
class Pipeline:
    """``order-pipeline run`` with one worker, as a process."""

    workdir: Path
    mqtt_url: str
    redis_url: str
    settings: dict[str, Any] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        config = PipelineConfig(
            redis_url=self.redis_url,
            mqtt_url=self.mqtt_url,
            shards=SHARDS,
            workers=1,
            http_port=free_port(),
            block_ms=100,
            claim_idle_ms=1000,
            claim_every_ms=1000,
            **self.settings,
        )
        self.process = spawn(["run"], env_for(config), self.workdir / "pipeline.log")

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        """SIGKILL the workers, then the supervisor (a worker orphaned before it
        agreed the layout would retry a Redis that is gone, for ever)."""
        if self.alive():
            assert self.process is not None
            for pid in child_pids(self.process.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            self.process.kill()
            self.process.wait(10)
