"""Helpers for the bridge tests: orders, a paho publisher, a receipt collector,
the bridge as a real subprocess, and a real 3-master Redis Cluster."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
import redis
from paho.mqtt.enums import CallbackAPIVersion

from schemas import Receipt, decode_receipt
from servicekit.urls import MqttUrl
from testrig.cluster import ClusterGroup
from testrig.servers import START_TIMEOUT_S, RedisProcess, free_port, port_is_open
from tests.helpers import wait_until_blocking
from tests.tools import require_tool

ROOT = Path(__file__).resolve().parents[2]


def close_paho(client: paho.Client) -> None:
    """Disconnect, stop the network thread and close paho's wake-up socket pair.

    paho closes that pair only in ``Client.__del__``; when the client sits in a
    reference cycle the collector may finalize the sockets first, and their
    ResourceWarning then fails whichever test happens to be running.
    """
    client.disconnect()
    client.loop_stop()
    client._reset_sockets()


class Publisher:
    """A paho MQTT 5 client publishing at QoS 1 from its network thread."""

    def __init__(self, url: str, client_id: str | None = None) -> None:
        parsed = MqttUrl.parse(url)
        self._client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id or f"pub-{uuid.uuid4().hex[:8]}",
            protocol=paho.MQTTv5,
        )
        self._client.max_inflight_messages_set(1000)
        self._client.max_queued_messages_set(0)
        self._client.connect(parsed.host, parsed.port)
        self._client.loop_start()
        self._infos: list[paho.MQTTMessageInfo] = []

    def publish(self, topic: str, payload: bytes) -> None:
        """Queue one QoS 1 publish."""
        self._infos.append(self._client.publish(topic, payload, qos=1))

    def wait_all(self, timeout_s: float = 60.0) -> None:
        """Wait until the broker acked every publish so far."""
        deadline = time.monotonic() + timeout_s
        for info in self._infos:
            info.wait_for_publish(max(0.1, deadline - time.monotonic()))
            assert info.is_published(), "broker did not ack a publish"
        self._infos.clear()

    def close(self) -> None:
        """Disconnect and stop the network thread."""
        close_paho(self._client)


class ReceiptCollector:
    """Subscribes to every device's receipts and keeps them by device."""

    def __init__(self, url: str) -> None:
        parsed = MqttUrl.parse(url)
        self.receipts: list[tuple[str, Receipt]] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self._client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"rc-{uuid.uuid4().hex[:8]}",
            protocol=paho.MQTTv5,
        )
        self._client.on_message = self._on_message
        self._client.on_subscribe = lambda *_: self._subscribed.set()
        self._client.connect(parsed.host, parsed.port)
        self._client.subscribe("v1/devices/+/receipts", qos=1)
        self._client.loop_start()
        assert self._subscribed.wait(10), "receipt subscription not acked"

    def _on_message(self, client: Any, userdata: Any, msg: paho.MQTTMessage) -> None:
        receipt = decode_receipt(msg.payload)
        with self._lock:
            self.receipts.append((msg.topic.split("/")[2], receipt))

    def snapshot(self) -> list[tuple[str, Receipt]]:
        """The receipts so far."""
        with self._lock:
            return list(self.receipts)

    def close(self) -> None:
        """Disconnect."""
        close_paho(self._client)


@pytest.fixture
def receipts(mqtt_url: str) -> Iterator[ReceiptCollector]:
    """A receipt collector on the shared broker."""
    collector = ReceiptCollector(mqtt_url)
    yield collector
    collector.close()


@pytest.fixture
def publisher(mqtt_url: str) -> Iterator[Publisher]:
    """A QoS 1 publisher on the shared broker."""
    pub = Publisher(mqtt_url)
    yield pub
    pub.close()


class BridgeProcess:
    """``order-bridge`` as a real subprocess we can SIGTERM and SIGKILL."""

    def __init__(self, workdir: Path, mqtt_url: str, redis_url: str, *extra: str) -> None:
        self.http_port = free_port()
        self.client_id = f"bridge-{uuid.uuid4().hex[:8]}"
        self.log_path = workdir / f"{self.client_id}.log"
        self.argv = [
            sys.executable, "-m", "bridge.cli",
            "--mqtt-url", mqtt_url, "--redis-url", redis_url,
            "--client-id", self.client_id, "--http-port", str(self.http_port),
            "--http-host", "127.0.0.1", "--shards", "4", "--rate-per-s", "0",
            # The shared test Redis runs the dev settings (no AOF); tests that stand
            # for production start Redis with redis/redis.conf and turn this back on.
            "--log-level", "info", "--no-redis-require-durable",
            # A group of its own unless the test names one: on the shared broker a
            # dead bridge's session (expiry 1 h) would keep its share of the orders.
            "--share-group", f"g-{self.client_id}", *extra,
        ]  # fmt: skip
        self.process: subprocess.Popen[bytes] | None = None

    def with_args(self, *extra: str) -> BridgeProcess:
        """Replace or add flags before starting."""
        self.argv += list(extra)
        return self

    def start(self, *, wait_ready: bool = True) -> None:
        """Start the process and wait until ``/readyz`` answers 200."""
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy()
            )
        if wait_ready:
            # testrig's bound for a service start: its imports alone took over 10 s under load.
            wait_until_blocking(
                lambda: self.status("/readyz") == 200,
                START_TIMEOUT_S,
                "bridge ready",
                explain=self.log_tail,
            )

    def status(self, path: str) -> int | None:
        """HTTP status of one ops endpoint, or None when nothing answers."""
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"bridge exited {self.process.returncode}:\n{self.log_tail()}")
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{self.http_port}{path}", timeout=2
            ) as response:
                return int(response.status)
        except urllib.error.HTTPError as exc:
            return exc.code
        except OSError:
            return None

    def metrics(self) -> str:
        """The ``/metrics`` page."""
        with urllib.request.urlopen(
            f"http://127.0.0.1:{self.http_port}/metrics", timeout=2
        ) as response:
            return str(response.read().decode())

    def kill(self) -> int:
        """SIGKILL; returns the dead pid after proving it is gone."""
        assert self.process is not None
        pid = self.process.pid
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)
        assert self.process.returncode == -signal.SIGKILL
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
        assert not port_is_open(self.http_port)
        return pid

    def terminate(self, timeout_s: float = 30.0) -> int:
        """SIGTERM and wait for the exit code."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout_s)

    def log_tail(self, lines: int = 30) -> str:
        """The end of the bridge's log."""
        with contextlib.suppress(FileNotFoundError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return "(no log)"

    def stop(self) -> None:
        """Kill if still running (cleanup)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


@pytest.fixture
def bridge_factory(tmp_path: Path) -> Iterator[Callable[..., BridgeProcess]]:
    """Build bridge subprocesses; every one is killed at the end of the test."""
    made: list[BridgeProcess] = []

    def make(mqtt_url: str, redis_url: str, *extra: str) -> BridgeProcess:
        bridge = BridgeProcess(tmp_path, mqtt_url, redis_url, *extra)
        made.append(bridge)
        return bridge

    yield make
    for bridge in made:
        bridge.stop()


def stream_entries(client: redis.Redis, shards: int = 4) -> list[dict[bytes, bytes]]:
    """Every entry of every shard stream."""
    entries: list[dict[bytes, bytes]] = []
    for shard in range(shards):
        rows: Any = client.xrange(f"orders:{{{shard}}}")  # redis-py types the rows as optional
        entries += [fields for _, fields in rows]
    return entries


@contextlib.contextmanager
def running_cluster(workdir: Path) -> Iterator[list[int]]:
    """A real 3-master Redis Cluster on loopback, killed on exit; yields the ports."""
    with cluster_servers(workdir) as servers:
        yield [server.port for server in servers]


@contextlib.contextmanager
def cluster_servers(workdir: Path, replicas: int = 0) -> Iterator[list[RedisProcess]]:
    """A real Redis Cluster of 3 masters with ``replicas`` replicas each, killed on exit.

    Yields the servers, so a fault test can kill or stop one; which are masters is
    the cluster's choice (ROLE or INFO replication of each).
    """
    with ClusterGroup(workdir, replicas=replicas) as group:
        yield group.servers


@pytest.fixture
def redis_cluster(tmp_path: Path) -> Iterator[list[int]]:
    """A real 3-master Redis Cluster on loopback; yields the ports."""
    require_tool("redis-cli")
    with running_cluster(tmp_path) as ports:
        yield ports
