"""A local stack on free ports: Mosquitto brokers, Redis, order-bridge replicas, order-pipeline.

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
from testrig.sentinel import MASTER_NAME, SentinelGroup
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
    # Mosquitto brokers of the region: the devices spread over them (hashed list
    # order), each bridge and the pipeline connect to all of them.
    brokers: int = 1
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
    # Replicas of the Redis master, watched by three Sentinels (testrig.sentinel); the
    # services find the master through them and wait for one replica per batch
    # (--redis-min-replicas 1). For the redis-failover and redis-freeze chaos kinds.
    redis_replicas: int = 0
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
        # Live enrolment (dynsec) runs on the first broker only: each broker would need
        # its own accounts file, and enrol-revoke drives one.
        self.brokers = [
            MosquittoProcess(
                workdir / ("mosquitto" if i == 0 else f"mosquitto{i}"),
                persistence=settings.broker_persistence,
                extra_conf=plugin if i == 0 else "",
            )
            for i in range(max(1, settings.brokers))
        ]
        self.broker = self.brokers[0]
        self.redis_disk: PowerCutMount | None = None
        redis_args: tuple[str, ...] = ()
        if settings.redis_powercut:
            if settings.redis_replicas:
                raise ServerError("redis_powercut and redis_replicas do not go together")
            self.redis_disk = PowerCutMount(workdir / "redis-disk")
            redis_args = ("--dir", str(self.redis_disk.path))  # a later --dir wins
        self.ha: SentinelGroup | None = None
        if settings.redis_replicas:
            maxmemory = (
                ("--maxmemory", settings.redis_maxmemory) if settings.redis_maxmemory else ()
            )
            self.ha = SentinelGroup(
                workdir / "redis", replicas=settings.redis_replicas, extra_args=maxmemory
            )
            self.redis = self.ha.master  # the first master; a failover moves it (master())
        else:
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
                "--mqtt-url", self.mqtt_url, "--redis-url", self.redis.url,
                "--shards", str(settings.shards), "--workers", str(settings.workers),
                "--claim-idle-ms", str(settings.claim_idle_ms),
                "--claim-every-ms", str(min(1_000, settings.claim_idle_ms)),
                *self.sentinel_flags(),
            ],
        )  # fmt: skip
        for service in (*self.bridges, self.pipeline):
            service.start_timeout_s = SERVICE_START_TIMEOUT_S

    def _bridge(self, index: int, run: str) -> ServiceProcess:
        argv = [
            console_script("order-bridge"),
            "--mqtt-url", self.mqtt_url, "--redis-url", self.redis.url,
            "--shards", str(self.settings.shards), "--client-id", f"fleet-{run}-bridge{index}",
            # No trimming: the verifier counts every entry a run appended.
            "--trim-every-batches", "0", *self.sentinel_flags(),
        ]  # fmt: skip
        if self.ha is not None:
            argv += ["--redis-min-replicas", "1"]
        return ServiceProcess(f"bridge{index}", self.workdir / f"bridge{index}", argv)

    @property
    def mqtt_url(self) -> str:
        """Where devices connect: the brokers' URLs, comma-separated."""
        return ",".join(broker.url for broker in self.brokers)

    @property
    def redis_url(self) -> str:
        """Where the streams are (the master now, with replicas)."""
        return self.master().url

    @property
    def redis_sentinels(self) -> tuple[str, ...]:
        """HOST:PORT of each Sentinel (none without replicas)."""
        return tuple(self.ha.sentinel_addresses) if self.ha is not None else ()

    def sentinel_flags(self) -> list[str]:
        """The services' flags that find the master through the Sentinels."""
        flags = ["--redis-sentinel-master", MASTER_NAME] if self.ha is not None else []
        for address in self.redis_sentinels:
            flags += ["--redis-sentinel", address]
        return flags

    def master(self) -> RedisProcess:
        """The Redis master now: the one the Sentinels name, once they agree."""
        if self.ha is None:
            return self.redis
        port = self.ha.master_port()
        return self.ha.node(port) if port is not None else self.redis

    def urls(self) -> dict[str, str]:
        """Every part's URL, for people poking at the stack."""
        out = {"mqtt": self.mqtt_url, "redis": self.redis.url}
        if self.ha is not None:
            out["sentinels"] = " ".join(self.redis_sentinels)
            out["replicas"] = " ".join(replica.url for replica in self.ha.replicas)
        for bridge in self.bridges:
            out[bridge.name] = bridge.url + "/metrics"
        out["pipeline API"] = self.pipeline.url + "/v1/orders/{order_id}"
        return out

    def start(self) -> None:
        """Start everything, load the catalog, and wait until each part is ready."""
        if self.settings.dynsec:
            write_open_accounts(self.accounts_path, self.admin_password)
        for broker in self.brokers:
            broker.start()
        if self.redis_disk is not None:
            self.redis_disk.start()
        if self.ha is not None:
            self.ha.start()
        else:
            self.redis.start()
        self.load_catalog()
        for bridge in self.bridges:
            bridge.start()
        self.pipeline.start()

    def load_catalog(self) -> None:
        """``order-pipeline catalog load`` (sets prices and stock)."""
        result = subprocess.run(
            [console_script("order-pipeline"), "catalog", "load", str(self.settings.catalog),
             "--redis-url", self.redis.url, "--shards", str(self.settings.shards),
             *self.sentinel_flags()],
            capture_output=True, check=False, timeout=60,
        )  # fmt: skip
        if result.returncode != 0:
            raise ServerError(f"catalog load failed: {result.stderr.decode(errors='replace')}")

    def stop(self) -> None:
        """SIGTERM every part, services first (they drain), servers last."""
        for service in (*self.bridges, self.pipeline):
            service.stop()
        if self.ha is not None:
            for server in (*self.ha.sentinels, *self.ha.nodes):
                server.stop()
        self.redis.stop()
        if self.redis_disk is not None:
            self.redis_disk.stop()
        for broker in self.brokers:
            broker.stop()

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
