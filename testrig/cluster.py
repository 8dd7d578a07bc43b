"""A Redis Cluster on loopback: 3 masters with ``replicas`` replicas each, for tests and fleet-sim.

:class:`ClusterGroup` starts the nodes, joins them (``redis-cli --cluster
create``) and waits until every node maps every slot and every replica's link
is up. A fault test asks it who holds a key's slot now
(:meth:`ClusterGroup.master_port_of`, from a live node's ``CLUSTER SLOTS``). A
node that was SIGKILLed and is started again keeps its port and its
``nodes.conf``: it rejoins the cluster (as a replica if its master role was
taken over meanwhile).

Errors: :class:`testrig.errors.ServerError` when the cluster does not come up.
"""

from __future__ import annotations

import contextlib
import random
import shutil
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import redis

from .errors import ServerError
from .sentinel import node_client
from .servers import RedisProcess, find_binary, free_port

MASTERS = 3  # the fewest a Cluster accepts
NODE_TIMEOUT_MS = 2000


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free too.

    Both lie below the kernel's ephemeral range (32768 and up on Linux), so an
    outgoing connection of another process cannot take the bus port between
    this check and Redis binding it (a kernel-chosen port + 10000 often did).
    """
    rng = random.Random()
    for _ in range(1000):
        port = rng.randrange(12000, 22000)
        if _bindable(port) and _bindable(port + 10000):
            return port
    return free_port()  # pragma: no cover - a crowded low range; the old way


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class ClusterGroup:
    """``3 × (1 + replicas)`` cluster-enabled redis-servers joined into one Cluster.

    Args:
        workdir: each node gets a directory below it.
        replicas: replicas per master (``--cluster-replicas``).
        conf: a redis.conf for every node (each gets its own copy: a node rewrites
            its file); None: the dev settings of :class:`RedisProcess`.
        node_timeout_ms: ``cluster-node-timeout``: how long a master may be silent
            before its replica takes over.
        extra_args: more redis-server arguments for every node.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        replicas: int = 0,
        conf: Path | None = None,
        node_timeout_ms: int = NODE_TIMEOUT_MS,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.workdir = workdir
        self.replicas = replicas
        self.conf = conf
        self.node_timeout_ms = node_timeout_ms
        # A replica that (re)joins syncs at once, not after Redis's default 5 s wait for
        # more replicas to share the transfer: with --redis-min-replicas, receipts for
        # that master's shards wait for it.
        sync = ("--repl-diskless-sync-delay", "0") if replicas else ()
        self.extra_args = (*sync, *extra_args)
        self.servers = [self._node(index) for index in range(MASTERS * (1 + replicas))]

    def _node(self, index: int) -> RedisProcess:
        port = cluster_port()
        workdir = self.workdir / f"cluster-{index}" / f"port-{port}"
        conf = None
        if self.conf is not None:
            workdir.mkdir(parents=True, exist_ok=True)
            conf = workdir / "redis.conf"
            shutil.copyfile(self.conf, conf)
        return RedisProcess(
            workdir,
            port,
            conf=conf,
            extra_args=(
                "--cluster-enabled", "yes",
                "--cluster-config-file", f"nodes-{port}.conf",
                "--cluster-node-timeout", str(self.node_timeout_ms),
                *self.extra_args,
            ),
        )  # fmt: skip

    @property
    def ports(self) -> list[int]:
        """Every node's port."""
        return [server.port for server in self.servers]

    def start(self, timeout_s: float = 30.0, attempts: int = 5) -> None:
        """Start every node (another port when its bus port was taken meanwhile), create the
        Cluster and return once every node maps every slot and every replica is linked."""
        try:
            for index in range(len(self.servers)):
                self._start_node(index, attempts)
            create = [find_binary("redis-cli"), "--cluster", "create", "--cluster-yes"]
            if self.replicas:
                create += ["--cluster-replicas", str(self.replicas)]
            subprocess.run(
                [*create, *[f"127.0.0.1:{port}" for port in self.ports]],
                check=True,
                capture_output=True,
                timeout=60,
            )
            deadline = time.monotonic() + timeout_s
            while not self.settled() and time.monotonic() < deadline:
                time.sleep(0.1)
        except BaseException:
            self.kill()
            raise
        if not self.settled():
            self.kill()
            raise ServerError("the cluster did not settle (cluster_state:ok, replicas up)")

    def _start_node(self, index: int, attempts: int) -> None:
        for attempt in range(attempts):
            try:
                self.servers[index].start()
            except ServerError:
                self.servers[index].kill()
                if attempt == attempts - 1:
                    raise
                self.servers[index] = self._node(index)
            else:
                return

    def settled(self) -> bool:
        """Every node says ``cluster_state:ok`` and every replica's master link is up."""
        for port in self.ports:
            try:
                with node_client(port) as client:
                    info = _text(client.execute_command("CLUSTER", "INFO"))
                    link: Any = client.info("replication")
            except (redis.RedisError, OSError):
                return False
            if "cluster_state:ok" not in info:
                return False
            if link["role"] == "slave" and link.get("master_link_status") != "up":
                return False
        return True

    def node(self, port: int) -> RedisProcess:
        """The node on ``port``."""
        return next(server for server in self.servers if server.port == port)

    def master_port_of(self, key: str) -> int | None:
        """The port of the master serving ``key``'s slot, as the first live node sees it."""
        for server in self.servers:
            if not server.running:
                continue
            try:
                with node_client(server.port) as client:
                    slot = int(client.execute_command("CLUSTER", "KEYSLOT", key))
                    ranges: Any = client.execute_command("CLUSTER", "SLOTS")
            except (redis.RedisError, OSError):
                continue
            for first, last, master, *_replicas in ranges:
                if int(first) <= slot <= int(last):
                    return int(master[1])
        return None

    def kill(self) -> None:
        """SIGKILL every node (teardown)."""
        for server in self.servers:
            with contextlib.suppress(ProcessLookupError):
                server.kill()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.kill()
