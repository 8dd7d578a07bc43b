"""A local stack on free ports: Mosquitto brokers, Redis, order-bridge replicas, order-pipeline.

Every part is a real subprocess the chaos schedule can stop, SIGKILL and
restart. Redis is one server, a master with replicas and three Sentinels
(``redis_replicas``), or a Redis Cluster of three masters with
``redis_replicas`` replicas each (``redis_cluster``). Redis runs with the
shipped ``redis/redis.conf`` (AOF, ``appendfsync always``, ``maxmemory`` with
``noeviction``), so a stop/start or power cut loses nothing acknowledged; the
broker runs without persistence, the harsher case (the agents resend).

::

    with Stack(workdir, StackSettings(bridges=2)) as stack:
        print(stack.mqtt_url, stack.redis_url)
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

import msgspec

from enrolment.dynsec import Accounts
from schemas.names import stream_key
from testrig.cluster import MASTERS as CLUSTER_MASTERS
from testrig.cluster import ClusterGroup
from testrig.errors import ServerError
from testrig.powercut import PowerCutMount
from testrig.sentinel import MASTER_NAME, SentinelGroup, role
from testrig.servers import REDIS_CONF, MosquittoProcess, RedisProcess, find_dynsec_plugin
from testrig.services import ServiceProcess, child_pids, console_script, pid_alive

REPO = Path(__file__).resolve().parents[1]
# A Python service's start (imports, Redis and broker checks) takes seconds on a
# crowded machine: far more than the servers' 10 s default allows.
SERVICE_START_TIMEOUT_S = 60.0
DEMO_CATALOG = REPO / "pipeline" / "demo_catalog.toml"
# The stack's Cluster: a master silent this long is failed over (promotion came about
# 1-2 s later in the runs here), on a par with the Sentinels' down-after of 1000 ms.
CLUSTER_NODE_TIMEOUT_MS = 1000
# The slot whose master the redis-failover and redis-freeze chaos kinds hit on a Cluster.
CHAOS_KEY = stream_key(0)


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
    # A Redis Cluster of three masters (with ``redis_replicas`` replicas each) instead:
    # the services get --redis-cluster, and the chaos kinds hit shard 0's master.
    redis_cluster: bool = False
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
        self.cluster: ClusterGroup | None = None
        maxmemory = ("--maxmemory", settings.redis_maxmemory) if settings.redis_maxmemory else ()
        if settings.redis_cluster:
            if settings.redis_powercut:
                raise ServerError("redis_powercut and redis_cluster do not go together")
            # No min-replicas-to-write on the Cluster: it runs one replica per master (what
            # fits here), so after a failover the new master would refuse every write, the
            # pipeline's too (receipts wait anyway, on WAIT), until the old node has rejoined
            # and synced, and a replica lost for good would stop its master's shards.
            self.cluster = ClusterGroup(
                workdir / "redis", replicas=settings.redis_replicas, conf=REDIS_CONF,
                node_timeout_ms=CLUSTER_NODE_TIMEOUT_MS, extra_args=maxmemory,
            )  # fmt: skip
            self.redis = self.cluster.servers[0]  # the services' entry node
        elif settings.redis_replicas:
            # min-replicas-to-write 1: a master all of whose replicas left (for a promoted
            # one) refuses writes (NOREPLICAS, retried by the services) instead of taking
            # what its demotion discards. min-replicas-max-lag stays 10 s: the stack's
            # faults (SIGKILL, SIGSTOP) close the replicas' links, which counts them out at
            # once; a shorter lag only adds refusals when a busy machine delays their ACKs.
            self.ha = SentinelGroup(
                workdir / "redis", replicas=settings.redis_replicas, min_replicas_to_write=1,
                extra_args=maxmemory,
            )  # fmt: skip
            self.redis = self.ha.master  # the first master; a failover moves it (master())
        else:
            self.redis = RedisProcess.production(
                workdir / "redis", maxmemory=settings.redis_maxmemory, extra_args=redis_args
            )
        self._run = uuid.uuid4().hex[:6]
        self._services()

    def _services(self) -> None:
        """The bridges and the pipeline (again once a Cluster's node took another port)."""
        settings = self.settings
        self.bridges = [self._bridge(i) for i in range(settings.bridges)]
        self.pipeline = ServiceProcess(
            "pipeline",
            self.workdir / "pipeline",
            [
                console_script("order-pipeline"),
                "--mqtt-url", self.mqtt_url, "--redis-url", self.redis.url,
                "--shards", str(settings.shards), "--workers", str(settings.workers),
                "--claim-idle-ms", str(settings.claim_idle_ms),
                "--claim-every-ms", str(min(1_000, settings.claim_idle_ms)),
                *self.redis_flags(),
            ],
        )  # fmt: skip
        for service in (*self.bridges, self.pipeline):
            service.start_timeout_s = SERVICE_START_TIMEOUT_S

    def _bridge(self, index: int) -> ServiceProcess:
        argv = [
            console_script("order-bridge"),
            "--mqtt-url", self.mqtt_url, "--redis-url", self.redis.url,
            "--shards", str(self.settings.shards),
            "--client-id", f"fleet-{self._run}-bridge{index}",
            # No trimming: the verifier counts every entry a run appended.
            "--trim-every-batches", "0", *self.redis_flags(),
        ]  # fmt: skip
        if self.replicated:
            argv += ["--redis-min-replicas", "1"]
        return ServiceProcess(f"bridge{index}", self.workdir / f"bridge{index}", argv)

    @property
    def replicated(self) -> bool:
        """Whether Redis has replicas that take over (Sentinel, or a Cluster with replicas)."""
        return self.ha is not None or (self.cluster is not None and self.cluster.replicas > 0)

    @property
    def mqtt_url(self) -> str:
        """Where devices connect: the brokers' URLs, comma-separated."""
        return ",".join(broker.url for broker in self.brokers)

    @property
    def redis_url(self) -> str:
        """Where the streams are (the master now, with replicas; a live node of a Cluster)."""
        if self.cluster is not None:
            return next((s.url for s in self.cluster.servers if s.running), self.redis.url)
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

    def redis_flags(self) -> list[str]:
        """The services' flags that say how to reach Redis (Sentinels, or a Cluster)."""
        return ["--redis-cluster"] if self.cluster is not None else self.sentinel_flags()

    def master_port(self) -> int | None:
        """The port of the master the chaos kinds hit: the Sentinels' master once a majority
        agree, or on a Cluster the master of :data:`CHAOS_KEY`'s slot; None if unknown."""
        if self.cluster is not None:
            return self.cluster.master_port_of(CHAOS_KEY)
        if self.ha is not None:
            return self.ha.master_port()
        return self.redis.port

    def master(self) -> RedisProcess:
        """The Redis master now (see :meth:`master_port`)."""
        port = self.master_port()
        if port is None:
            return self.redis
        if self.cluster is not None:
            return self.cluster.node(port)
        return self.ha.node(port) if self.ha is not None else self.redis

    def stale_masters(self) -> list[int]:
        """Ports of running nodes that say master (ROLE) but hold no master's place: a
        master frozen past a failover, resumed and not yet demoted."""
        if self.cluster is not None:
            roles = {port: role(port) for port in self.cluster.ports}
            masters = [port for port, said in roles.items() if said == "master"]
            return masters if len(masters) > CLUSTER_MASTERS else []
        if self.ha is None:
            return []
        agreed = self.ha.master_port()
        return [n.port for n in self.ha.nodes if n.port != agreed and role(n.port) == "master"]

    def wait_single_master(self, timeout_s: float) -> bool:
        """Wait until :meth:`stale_masters` is empty; False if not within ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while self.stale_masters():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.1)
        return True

    def promoted(self, old_port: int) -> int | None:
        """The port of a master that replaced the one on ``old_port`` (ROLE agrees), or None."""
        port = self.master_port()
        if port is not None and port != old_port and role(port) == "master":
            return port
        return None

    def urls(self) -> dict[str, str]:
        """Every part's URL, for people poking at the stack."""
        out = {"mqtt": self.mqtt_url, "redis": self.redis.url}
        if self.ha is not None:
            out["sentinels"] = " ".join(self.redis_sentinels)
            out["replicas"] = " ".join(replica.url for replica in self.ha.replicas)
        if self.cluster is not None:
            out["redis"] += " (--redis-cluster)"
            out["cluster nodes"] = " ".join(str(port) for port in self.cluster.ports)
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
        if self.cluster is not None:
            self.cluster.start()
            self.redis = self.cluster.servers[0]  # a node may have moved to a free port
            self._services()
        elif self.ha is not None:
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
             *self.redis_flags()],
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
        if self.cluster is not None:
            for node in self.cluster.servers:
                node.stop()
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
