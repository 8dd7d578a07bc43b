"""A local stack on free ports: Mosquitto, Redis, order-bridge replicas, order-pipeline.

Every part is a real subprocess the chaos schedule can stop, SIGKILL and
restart. Redis runs with the shipped ``redis/redis.conf`` (AOF, ``appendfsync
always``, ``maxmemory`` with ``noeviction``), so a stop/start or power cut
loses nothing acknowledged; the broker runs without persistence, the harsher
case (the agents resend).

::

    with Stack(workdir, StackSettings(bridges=2)) as stack:
        print(stack.mqtt_url, stack.redis_url)
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

import msgspec

from enrolment.dynsec import Accounts
from testrig.errors import ServerError
from testrig.powercut import PowerCutMount
from testrig.servers import MosquittoProcess, RedisProcess, find_dynsec_plugin
from testrig.services import ServiceProcess, child_pids, console_script, pid_alive

REPO = Path(__file__).resolve().parents[1]
# A Python service's start (imports, Redis and broker checks) takes seconds on a
# crowded machine: far more than the servers' 10 s default allows.
SERVICE_START_TIMEOUT_S = 60.0
DEMO_CATALOG = REPO / "pipeline" / "demo_catalog.toml"


@dataclass(frozen=True)
class StackSettings:
    """How big the stack is and how quickly its parts recover."""

    shards: int = 4
    bridges: int = 1
    workers: int = 1
    catalog: Path = DEMO_CATALOG
    # Short, so a SIGKILLed worker's entries are reclaimed within a short run.
    claim_idle_ms: int = 3_000
    broker_persistence: bool = False
    # Overrides redis/redis.conf's maxmemory for this run (None: the file's value).
    redis_maxmemory: str | None = None
    # Redis keeps its files on a power-cut filesystem (testrig.powercut), for the
    # redis-powercut chaos kind; needs /dev/fuse and libfuse 3.
    redis_powercut: bool = False
    # The broker runs the dynamic-security plugin with an ``admin`` account, so
    # devices can be enrolled and revoked live (the enrol-revoke chaos kind).
    # Anonymous clients (the simulated fleet, the services) keep every right.
    dynsec: bool = False


class Stack:
    """Owns the stack's processes; ``with`` starts them all and stops them all."""

    def __init__(self, workdir: Path, settings: StackSettings = StackSettings()) -> None:
        self.workdir = workdir
        self.settings = settings
        # The dynamic-security admin's password (settings.dynsec), for live enrolment.
        self.admin_password = secrets.token_urlsafe(18) if settings.dynsec else ""
        self.accounts_path = workdir / "mosquitto" / "dynamic-security.json"
        plugin = (
            f"plugin {find_dynsec_plugin()}\nplugin_opt_config_file {self.accounts_path}"
            if settings.dynsec
            else ""
        )
        self.broker = MosquittoProcess(
            workdir / "mosquitto", persistence=settings.broker_persistence, extra_conf=plugin
        )
        self.redis_disk: PowerCutMount | None = None
        redis_args: tuple[str, ...] = ()
        if settings.redis_powercut:
            self.redis_disk = PowerCutMount(workdir / "redis-disk")
            redis_args = ("--dir", str(self.redis_disk.path))  # a later --dir wins
        self.redis = RedisProcess.production(
            workdir / "redis", maxmemory=settings.redis_maxmemory, extra_args=redis_args
        )
        run = uuid.uuid4().hex[:6]
        self.bridges = [self._bridge(i, run) for i in range(settings.bridges)]
        self.pipeline = ServiceProcess(
            "pipeline",
            workdir / "pipeline",
            [
                console_script("order-pipeline"),
                "--mqtt-url", self.broker.url, "--redis-url", self.redis.url,
                "--shards", str(settings.shards), "--workers", str(settings.workers),
                "--claim-idle-ms", str(settings.claim_idle_ms),
            ],
        )  # fmt: skip
        for service in (*self.bridges, self.pipeline):
            service.start_timeout_s = SERVICE_START_TIMEOUT_S

    def _bridge(self, index: int, run: str) -> ServiceProcess:
        argv = [
            console_script("order-bridge"),
            "--mqtt-url", self.broker.url, "--redis-url", self.redis.url,
            "--shards", str(self.settings.shards), "--client-id", f"fleet-{run}-bridge{index}",
            # No trimming: the verifier counts every entry a run appended.
            "--trim-every-batches", "0",
        ]  # fmt: skip
        return ServiceProcess(f"bridge{index}", self.workdir / f"bridge{index}", argv)

    @property
    def mqtt_url(self) -> str:
        """Where devices connect."""
        return self.broker.url

    @property
    def redis_url(self) -> str:
        """Where the streams are."""
        return self.redis.url

    def urls(self) -> dict[str, str]:
        """Every part's URL, for people poking at the stack."""
        out = {"mqtt": self.broker.url, "redis": self.redis.url}
        for bridge in self.bridges:
            out[bridge.name] = bridge.url + "/metrics"
        out["pipeline API"] = self.pipeline.url + "/v1/orders/{order_id}"
        return out

    def start(self) -> None:
        """Start everything, load the catalog, and wait until each part is ready."""
        if self.settings.dynsec:
            write_open_accounts(self.accounts_path, self.admin_password)
        self.broker.start()
        if self.redis_disk is not None:
            self.redis_disk.start()
        self.redis.start()
        self.load_catalog()
        for bridge in self.bridges:
            bridge.start()
        self.pipeline.start()

    def load_catalog(self) -> None:
        """``order-pipeline catalog load`` (sets prices and stock)."""
        result = subprocess.run(
            [console_script("order-pipeline"), "catalog", "load", str(self.settings.catalog),
             "--redis-url", self.redis.url, "--shards", str(self.settings.shards)],
            capture_output=True, check=False, timeout=60,
        )  # fmt: skip
        if result.returncode != 0:
            raise ServerError(f"catalog load failed: {result.stderr.decode(errors='replace')}")

    def stop(self) -> None:
        """SIGTERM every part, services first (they drain), servers last."""
        for service in (*self.bridges, self.pipeline):
            service.stop()
        self.redis.stop()
        if self.redis_disk is not None:
            self.redis_disk.stop()
        self.broker.stop()

    def worker_pids(self) -> list[int]:
        """The pipeline supervisor's worker processes."""
        pid = self.pipeline.pid
        return [] if pid is None else [p for p in child_pids(pid) if pid_alive(p)]

    def kill_worker(self) -> int | None:
        """SIGKILL one pipeline worker (the supervisor replaces it); return its pid."""
        pids = self.worker_pids()
        if not pids:
            return None
        os.kill(pids[0], signal.SIGKILL)
        return pids[0]

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def write_open_accounts(path: Path, admin_password: str) -> None:
    """A dynamic-security file with the ``admin`` account, everything else allowed.

    Clients no rule names (the anonymous fleet, the services) may do anything, as
    on the dev broker; accounts enrolled live get their device roles, and a
    revoked one is refused at CONNECT.
    """
    accounts = Accounts()
    accounts.set_service("admin", admin_password)
    path.parent.mkdir(parents=True, exist_ok=True)
    accounts.save(path)
    data = msgspec.json.decode(path.read_bytes())
    data["defaultACLAccess"] = dict.fromkeys(
        ("publishClientSend", "publishClientReceive", "subscribe", "unsubscribe"), True
    )
    path.write_bytes(msgspec.json.encode(data))
