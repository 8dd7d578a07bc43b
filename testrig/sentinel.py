"""A Redis master with replicas watched by Sentinels, on loopback: the failover rig.

:class:`SentinelProcess` is one ``redis-server --sentinel``. :class:`SentinelGroup`
starts a master, its replicas and the Sentinels, with timeouts small enough for a
test (``down_after_ms``, ``failover_timeout_ms``), and answers what a fault test
must prove: who is master now (:meth:`SentinelGroup.master_port`), and each
node's role from the node itself (:func:`role`).

:meth:`SentinelGroup.planned_failover` is the planned failover that loses no
acknowledged write: ``SENTINEL FAILOVER`` alone leaves the old master a writable
master until the Sentinels demote it (about 10 s on Redis 7.0), and what it takes
meanwhile is discarded at the demotion. Redis's own ``FAILOVER`` command pauses
writes for this, but the Sentinels fight it (redis/redis#13118), so the same
steps are done around ``SENTINEL FAILOVER``: pause writes on the old master,
let the Sentinels promote a replica, demote the old master at once, unpause.

Errors: :class:`testrig.errors.ServerError` when the group does not come up.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import redis

from .errors import ServerError
from .servers import REDIS_CONF, RedisProcess, ServerProcess, find_binary

MASTER_NAME = "orders"
# min-replicas-max-lag: a replica silent longer does not count for min-replicas-to-write.
MIN_REPLICAS_MAX_LAG_S = 10


def node_client(port: int) -> redis.Redis:
    """A client of the Redis node on ``port`` with 1 s timeouts, for probes of a fault test."""
    return redis.Redis(port=port, socket_timeout=1.0, socket_connect_timeout=1.0)


def role(port: int) -> str | None:
    """``master`` or ``slave`` as the node at ``port`` reports it (ROLE); None if unreachable."""
    try:
        with node_client(port) as client:
            reply: Any = client.execute_command("ROLE")
    except (redis.RedisError, OSError):
        return None
    first = reply[0]
    return first.decode() if isinstance(first, bytes) else str(first)


def replication(port: int) -> dict[str, Any]:
    """INFO replication of the node at ``port``; empty if unreachable."""
    try:
        with node_client(port) as client:
            info: dict[str, Any] = client.info("replication")
    except (redis.RedisError, OSError):
        return {}
    return info


class SentinelProcess(ServerProcess):
    """``redis-server --sentinel`` monitoring one master as :data:`MASTER_NAME`."""

    name = "sentinel"

    def __init__(
        self,
        workdir: Path,
        master_port: int,
        *,
        quorum: int,
        down_after_ms: int,
        failover_timeout_ms: int,
        port: int | None = None,
    ) -> None:
        super().__init__(workdir, port)
        self.monitored_port = master_port
        self.quorum = quorum
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        self.conf_path = workdir / "sentinel.conf"

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        # Sentinel rewrites its file (the new master, the other Sentinels): it must be writable.
        if not self.conf_path.exists():
            self.conf_path.write_text(
                "\n".join(
                    [
                        f"port {self.port}",
                        "bind 127.0.0.1",
                        f"dir {self.workdir}",
                        f"sentinel monitor {MASTER_NAME} 127.0.0.1 {self.monitored_port} "
                        f"{self.quorum}",
                        f"sentinel down-after-milliseconds {MASTER_NAME} {self.down_after_ms}",
                        f"sentinel failover-timeout {MASTER_NAME} {self.failover_timeout_ms}",
                        f"sentinel parallel-syncs {MASTER_NAME} 1",
                    ]
                )
                + "\n"
            )
        return [find_binary("redis-server"), str(self.conf_path), "--sentinel"]

    def master_port(self) -> int | None:
        """The port this Sentinel names as the master now; None if it does not answer."""
        try:
            with node_client(self.port) as client:
                reply: Any = client.execute_command(
                    "SENTINEL", "get-master-addr-by-name", MASTER_NAME
                )
        except (redis.RedisError, OSError):
            return None
        return int(reply[1]) if reply else None

    def others(self) -> int | None:
        """How many other Sentinels this one knows of; None if it does not answer."""
        try:
            with node_client(self.port) as client:
                state: Any = client.execute_command("SENTINEL", "master", MASTER_NAME)
        except (redis.RedisError, OSError):
            return None
        return int(state[b"num-other-sentinels"])  # a dict of bytes


class SentinelGroup:
    """A master (redis/redis.conf), ``replicas`` replicas of it and ``sentinels`` Sentinels.

    Args:
        workdir: each server gets a directory below it.
        min_replicas_to_write: each data node's ``min-replicas-to-write`` (with
            ``min-replicas-max-lag`` :data:`MIN_REPLICAS_MAX_LAG_S`): a master with
            fewer replicas connected refuses writes (NOREPLICAS), so an old master
            whose replicas all left for the promoted one takes nothing it would lose.
        extra_args: more redis-server arguments for every data node (master and replicas).
    """

    def __init__(
        self,
        workdir: Path,
        *,
        replicas: int = 1,
        sentinels: int = 3,
        down_after_ms: int = 1000,
        failover_timeout_ms: int = 5000,
        min_replicas_to_write: int = 0,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        if min_replicas_to_write:
            extra_args = (
                "--min-replicas-to-write", str(min_replicas_to_write),
                "--min-replicas-max-lag", str(MIN_REPLICAS_MAX_LAG_S),
                *extra_args,
            )  # fmt: skip
        self.master = _data_node(workdir / "redis-0", extra_args)
        self.replicas = [
            _data_node(
                workdir / f"redis-{index + 1}",
                (*extra_args, "--replicaof", "127.0.0.1", str(self.master.port)),
            )
            for index in range(replicas)
        ]
        self.sentinels = [
            SentinelProcess(
                workdir / f"sentinel-{index}",
                self.master.port,
                quorum=sentinels // 2 + 1,
                down_after_ms=down_after_ms,
                failover_timeout_ms=failover_timeout_ms,
            )
            for index in range(sentinels)
        ]

    @property
    def nodes(self) -> list[RedisProcess]:
        """The data nodes, the first master at the start first."""
        return [self.master, *self.replicas]

    @property
    def sentinel_addresses(self) -> list[str]:
        """HOST:PORT of every Sentinel (the services' ``--redis-sentinel`` values)."""
        return [sentinel.url for sentinel in self.sentinels]

    def start(self, timeout_s: float = 30.0) -> None:
        """Start every node and Sentinel; return once replicas are in sync and Sentinels agree."""
        try:
            for node in self.nodes:
                node.start()
            for sentinel in self.sentinels:
                sentinel.start()
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                if self._settled():
                    return
                time.sleep(0.1)
        except BaseException:
            self.kill()  # a Sentinel left behind would take over the next master on its port
            raise
        self.kill()
        raise ServerError("sentinel group did not settle (replicas linked, Sentinels agreeing)")

    def _settled(self) -> bool:
        if not all(replication(r.port).get("master_link_status") == "up" for r in self.replicas):
            return False
        return all(
            sentinel.others() == len(self.sentinels) - 1
            and sentinel.master_port() == self.master.port
            for sentinel in self.sentinels
        )

    def master_port(self) -> int | None:
        """The master the Sentinels name, once a majority of them agree; else None."""
        ports = [sentinel.master_port() for sentinel in self.sentinels]
        for port in set(ports):
            if port is not None and ports.count(port) > len(ports) // 2:
                return port
        return None

    def planned_failover(self, pause_ms: int = 30_000, timeout_s: float = 30.0) -> int:
        """Move the master to a replica with no acknowledged write lost; return its port.

        1. ``CLIENT PAUSE pause_ms WRITE`` on the master: writes wait (clients see no
           error, only a slower reply), the replicas receive all it acknowledged.
        2. ``SENTINEL FAILOVER``: the Sentinels promote a replica and tell the clients.
        3. Once a majority names it and its ROLE says master, ``REPLICAOF`` it on the
           old master: demoted now, not ~10 s later. Writes paused there answer
           READONLY when unpaused, and the clients look the master up again.
        4. ``CLIENT UNPAUSE`` (also when a step failed: the pause is never left on).

        Raises:
            ServerError: no promotion within ``timeout_s``.
        """
        old = self.master_port()
        if old is None:
            raise ServerError("the Sentinels do not agree on a master")
        with node_client(old) as master:
            master.execute_command("CLIENT", "PAUSE", pause_ms, "WRITE")
            try:
                self._sentinel_failover(timeout_s)
                new = self._promoted(old, timeout_s)
                master.execute_command("REPLICAOF", "127.0.0.1", new)
            finally:
                master.execute_command("CLIENT", "UNPAUSE")
        return new

    def _sentinel_failover(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                with node_client(self.sentinels[0].port) as sentinel:
                    sentinel.execute_command("SENTINEL", "FAILOVER", MASTER_NAME)
            except redis.ResponseError:
                # NOGOODSLAVE: a Sentinel that has not read the replicas' INFO yet.
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
            else:
                return

    def _promoted(self, old: int, timeout_s: float) -> int:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            port = self.master_port()
            if port is not None and port != old and role(port) == "master":
                return port
            time.sleep(0.05)
        raise ServerError(f"no replica promoted in place of :{old} within {timeout_s:g} s")

    def node(self, port: int) -> RedisProcess:
        """The data node on ``port``."""
        return next(node for node in self.nodes if node.port == port)

    def kill(self) -> None:
        """SIGKILL everything (teardown)."""
        for server in [*self.sentinels, *self.nodes]:
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


def _data_node(workdir: Path, extra_args: tuple[str, ...]) -> RedisProcess:
    """redis-server on its own copy of redis/redis.conf: Sentinel makes each node rewrite
    its file (CONFIG REWRITE) when it changes the node's role."""
    workdir.mkdir(parents=True, exist_ok=True)
    conf = workdir / "redis.conf"
    shutil.copyfile(REDIS_CONF, conf)
    return RedisProcess(workdir, conf=conf, extra_args=extra_args)
