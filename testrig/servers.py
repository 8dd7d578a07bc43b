"""Real Mosquitto and Redis processes on free loopback ports.

Used by the test fixtures, the benchmarks, ``make demo`` and ``fleet-sim stack``. Each server
owns one subprocess in a private working directory and can be stopped, killed
and restarted on the same port, which the fault tests need.

Errors: :class:`testrig.errors.ServerError`, a server binary is missing, or did not come up.
"""

from __future__ import annotations

import contextlib
import getpass
import itertools
import os
import random
import shutil
import signal
import socket
import subprocess
import time
from abc import ABC, abstractmethod
from pathlib import Path
from types import TracebackType
from typing import Self

from .errors import ServerError

# Only a bound for a server that never comes up: a Python service's imports alone took
# over 10 s on the 2-core machine under make test's two workers and other load.
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0
# The one Redis configuration production uses (AOF, appendfsync always, maxmemory noeviction).
REDIS_CONF = Path(__file__).resolve().parents[1] / "redis" / "redis.conf"
# Nagle's algorithm against the clients' delayed ACKs holds small packets for
# ~40 ms; Mosquitto leaves it on unless told otherwise.
NODELAY = "set_tcp_nodelay true"


# Ports are handed out below the kernel's ephemeral range: a port from bind(0) is let go
# before its server binds it, and in between any outgoing connection may take it as its
# source port ("address already in use"). Each xdist worker gets its own slice, and a
# process starts at a random point in it, so concurrent tests do not pick the same one.
PORTS_FROM = 10_000


def _ephemeral_low() -> int:
    with contextlib.suppress(OSError, ValueError, IndexError):
        text = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text()
        return int(text.split()[0])
    return 32_768


def _port_slice() -> range:
    low = _ephemeral_low()
    workers = max(1, int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1))
    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
    width = (low - PORTS_FROM) // workers
    start = PORTS_FROM + (worker % workers) * width
    return range(start, start + width)


_PORTS = _port_slice()
_next_port = itertools.count(random.randrange(len(_PORTS)))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now, outside the ephemeral range."""
    for _ in range(len(_PORTS)):
        port = _PORTS[next(_next_port) % len(_PORTS)]
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise ServerError(f"no free port in {_PORTS.start}-{_PORTS.stop - 1}")


def find_binary(name: str) -> str:
    """Path of a server binary; Debian puts some in /usr/sbin, off a user's PATH."""
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin")
    if found is None:
        raise ServerError(
            f"{name} not found: run `make test` (it installs it with apt-get) or install "
            f"it with your package manager (Debian/Ubuntu: mosquitto redis-server; "
            f"macOS: brew install mosquitto redis)"
        )
    return found


# Where distributions install Mosquitto's dynamic-security plugin.
DYNSEC_PLUGINS = (
    "/usr/lib/mosquitto_dynamic_security.so",
    "/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so",
    "/usr/lib/aarch64-linux-gnu/mosquitto_dynamic_security.so",
    "/usr/local/lib/mosquitto_dynamic_security.so",
    "/opt/homebrew/lib/mosquitto_dynamic_security.so",
)


def find_dynsec_plugin() -> str:
    """Path of Mosquitto's dynamic-security plugin.

    Raises:
        ServerError: not installed (Debian's ``mosquitto`` package ships it).
    """
    for candidate in DYNSEC_PLUGINS:
        if Path(candidate).exists():
            return candidate
    raise ServerError("mosquitto_dynamic_security.so not found (the mosquitto package has it)")


def port_is_open(port: int, host: str = "127.0.0.1") -> bool:
    """True when something accepts TCP connections on ``host:port``."""
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


class ServerProcess(ABC):
    """One server subprocess on a fixed loopback port."""

    name: str
    # How long start() waits for the server to answer (a crowded machine needs more).
    start_timeout_s: float = START_TIMEOUT_S

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        self.workdir = workdir
        self.port = port or free_port()
        self.log_path = workdir / f"{self.name}.log"
        self._process: subprocess.Popen[bytes] | None = None
        workdir.mkdir(parents=True, exist_ok=True)

    @property
    @abstractmethod
    def url(self) -> str:
        """Connection URL for clients."""

    @abstractmethod
    def command(self) -> list[str]:
        """The argv that starts the server in the foreground."""

    def is_ready(self) -> bool:
        """True once the server answers; the default checks the TCP port."""
        return port_is_open(self.port)

    @property
    def pid(self) -> int | None:
        """PID of the running process, or None."""
        return self._process.pid if self.running and self._process else None

    @property
    def running(self) -> bool:
        """True while the subprocess is alive."""
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        """Start the server and wait until it answers on its port."""
        if self.running:
            return
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                self.command(), cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise ServerError(f"{self.name} exited at start:\n{self.log_tail()}")
            if self.is_ready():
                return
            time.sleep(0.02)
        self.kill()
        raise ServerError(f"{self.name} not ready on port {self.port}:\n{self.log_tail()}")

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it does not exit in time."""
        self._signal(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL: the crash the fault tests inject."""
        self._signal(signal.SIGKILL)

    def restart(self) -> None:
        """Stop (if running) and start again on the same port."""
        self.stop()
        self.start()

    def log_tail(self, lines: int = 20) -> str:
        """The last lines of the server's log, for error messages."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"

    def _signal(self, sig: signal.Signals) -> None:
        process = self._process
        if process is None or process.poll() is not None:
            return
        process.send_signal(sig)
        try:
            process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        # Wait until the port is really released, so a restart can bind it.
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while port_is_open(self.port) and time.monotonic() < deadline:
            time.sleep(0.02)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class MosquittoProcess(ServerProcess):
    """Mosquitto with an anonymous loopback listener (the dev configuration).

    Args:
        persistence: keep the session/message store on disk across restarts.
        extra_conf: more mosquitto.conf lines (limits, auth, TLS listeners).
        config: a whole mosquitto.conf instead of the dev settings (it must
            open a listener on ``port``); ``persistence``/``extra_conf`` are ignored.
    """

    name = "mosquitto"

    def __init__(
        self,
        workdir: Path,
        port: int | None = None,
        *,
        persistence: bool = False,
        extra_conf: str = "",
        config: str | None = None,
    ) -> None:
        super().__init__(workdir, port)
        self.persistence = persistence
        self.extra_conf = extra_conf
        self.config = config
        self.conf_path = workdir / "mosquitto.conf"

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def reload(self) -> None:
        """SIGHUP: Mosquitto re-reads its password and ACL files."""
        if self._process is not None and self.running:
            self._process.send_signal(signal.SIGHUP)

    def command(self) -> list[str]:
        # Mosquitto started as root drops to user `mosquitto` and then cannot
        # write into our directory; `user` set to whoever we are prevents that.
        user = f"user {getpass.getuser()}"
        if self.config is not None:
            self.conf_path.write_text(f"{user}\n{NODELAY}\n{self.config}\n")
            return [find_binary("mosquitto"), "-c", str(self.conf_path)]
        lines = [
            user,
            f"listener {self.port} 127.0.0.1",
            "allow_anonymous true",
            # Defaults are 20 in flight and 1000 queued per client: far too few
            # for a bridge's persistent session while it restarts.
            "max_inflight_messages 1000",
            "max_queued_messages 1000000",
            "max_packet_size 20480",
            NODELAY,
            f"persistence {'true' if self.persistence else 'false'}",
            f"persistence_location {self.workdir}/",
            "autosave_interval 1",
            self.extra_conf,
        ]
        self.conf_path.write_text("\n".join(lines) + "\n")
        return [find_binary("mosquitto"), "-c", str(self.conf_path)]


class RedisProcess(ServerProcess):
    """redis-server on loopback.

    Without ``conf``: the dev settings (no RDB, AOF only with ``appendonly``,
    ``appendfsync everysec``), fast for tests that do not stand for production.
    With ``conf`` (normally :data:`REDIS_CONF`, see :meth:`production`): that
    file, plus this run's port, bind address and directory; ``maxmemory`` and
    ``appendfsync`` override the file per run, ``extra_args`` add anything else.
    """

    name = "redis"

    def __init__(
        self,
        workdir: Path,
        port: int | None = None,
        *,
        appendonly: bool = False,
        extra_args: tuple[str, ...] = (),
        conf: Path | None = None,
        maxmemory: str | None = None,
        appendfsync: str | None = None,
    ) -> None:
        super().__init__(workdir, port)
        self.appendonly = appendonly
        self.extra_args = extra_args
        self.conf = conf
        self.maxmemory = maxmemory
        self.appendfsync = appendfsync

    @classmethod
    def production(
        cls,
        workdir: Path,
        port: int | None = None,
        *,
        maxmemory: str | None = None,
        appendfsync: str | None = None,
        extra_args: tuple[str, ...] = (),
    ) -> RedisProcess:
        """Redis as production runs it: redis/redis.conf plus per-run overrides."""
        return cls(
            workdir,
            port,
            conf=REDIS_CONF,
            maxmemory=maxmemory,
            appendfsync=appendfsync,
            extra_args=extra_args,
        )

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def command(self) -> list[str]:
        overrides: list[str] = []
        if self.maxmemory is not None:
            overrides += ["--maxmemory", self.maxmemory]
        if self.appendfsync is not None:
            overrides += ["--appendfsync", self.appendfsync]
        if self.conf is not None:
            return [
                find_binary("redis-server"), str(self.conf),
                "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.workdir),
                *overrides, *self.extra_args,
            ]  # fmt: skip
        return [
            find_binary("redis-server"),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.workdir),
            "--save", "",
            "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", "everysec",
            *overrides,
            *self.extra_args,
        ]  # fmt: skip

    def is_ready(self) -> bool:
        with (
            contextlib.suppress(OSError),
            socket.create_connection(("127.0.0.1", self.port), 0.5) as sock,
        ):
            sock.sendall(b"PING\r\n")
            # NOAUTH: up, with a password (requirepass or an ACL file).
            return sock.recv(64).startswith((b"+PONG", b"-NOAUTH"))
        return False
