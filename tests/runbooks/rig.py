"""The deployment a runbook test runs its page against: production configs, real processes.

Redis runs redis/redis.conf with the project's ACL users (redis-acl/users.acl,
fresh passwords); the bridge and the pipeline log in as their own users with
password files in ``SECRETS_DIR``. The broker runs the production config
(mosquitto/secure.conf: TLS, the dynamic-security plugin) on an order-enrol
registry with a dev CA, the service accounts and the load's devices.
:meth:`Rig.env` is what the page's blocks see (tests/runbooks/runbook.py).
"""

from __future__ import annotations

import contextlib
import secrets
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from edge_agent import AgentConfig
from enrolment.pki import issue_cert
from enrolment.provision import Registry
from fleet.stack import DEMO_CATALOG
from testrig.servers import MosquittoProcess, RedisProcess, free_port
from testrig.services import ServiceProcess, console_script
from tests.bridge.conftest import BridgeProcess
from tests.enrolment.conftest import secure_config
from tests.helpers import wait_until_blocking

REPO = Path(__file__).resolve().parents[2]
SHARDS = 4
REDIS_USERS = ("admin", "bridge", "pipeline")
# Agents come back quickly after a refused or lost connection.
# Starting Python services on a crowded 2-core machine takes seconds, not the default 10 s cap.
START_TIMEOUT_S = 60.0
PORT_RACES = 3
FAST_RECONNECT = {"reconnect_min_s": 0.05, "reconnect_max_s": 0.5}


def _start_bridge(bridge: BridgeProcess) -> None:
    """Start a replica and wait until it is ready, with the rig's patience."""
    bridge.start(wait_ready=False)
    wait_until_blocking(lambda: bridge.status("/readyz") == 200, START_TIMEOUT_S,
                        f"bridge ready\n{bridge.log_tail()}")  # fmt: skip


def _drop_shards_flag(argv: list[str]) -> None:
    while "--shards" in argv:
        at = argv.index("--shards")
        del argv[at : at + 2]


def write_secret(directory: Path, name: str, secret: str) -> Path:
    """``secret`` on one line in a 0600 file, as a secrets store mounts it."""
    directory.mkdir(mode=0o700, exist_ok=True)
    path = directory / name
    path.write_text(secret + "\n")
    path.chmod(0o600)
    return path


@dataclass
class SecureBroker:
    """The production broker's files: its config dir (certs, accounts) and the registry."""

    server: MosquittoProcess
    conf_dir: Path
    registry: Registry

    @property
    def url(self) -> str:
        """mqtts://localhost:PORT (the certificate's name)."""
        return f"mqtts://localhost:{self.server.port}"


@dataclass
class Rig:
    """Redis, a broker, bridge replicas and a pipeline, all running."""

    workdir: Path
    secrets_dir: Path
    redis: RedisProcess
    secure: SecureBroker
    bridges: list[BridgeProcess] = field(default_factory=list)
    pipeline: ServiceProcess | None = None
    # None: the services adopt the deployment's count (after a change of it).
    shards_flag: int | None = SHARDS
    shards: int = SHARDS

    @property
    def mqtt_url(self) -> str:
        """Where devices and services connect."""
        return self.secure.url

    @property
    def broker(self) -> MosquittoProcess:
        """The Mosquitto process."""
        return self.secure.server

    def redis_url(self, user: str) -> str:
        """``redis://USER@127.0.0.1:PORT/0``; the password is in ``SECRETS_DIR/USER-redis``."""
        return f"redis://{user}@127.0.0.1:{self.redis.port}/0"

    def admin_url(self) -> str:
        """The admin user's URL with its current password, for the test's own checks."""
        password = (self.secrets_dir / "admin-redis").read_text().strip()
        return f"redis://admin:{password}@127.0.0.1:{self.redis.port}/0"

    def env(self) -> dict[str, str]:
        """The runbook variables (docs/how-to/index.md) for this rig."""
        return {
            "REDIS_HOST": "127.0.0.1",
            "REDIS_PORT": str(self.redis.port),
            "REDIS_URL": f"redis://127.0.0.1:{self.redis.port}/0",
            "SECRETS_DIR": str(self.secrets_dir),
            "BROKER_URL": self.mqtt_url,
            "BROKER_HOST": "localhost",
            "BROKER_PORT": str(self.broker.port),
            "MOSQUITTO_PID": str(self.broker.pid),
            "CERTS_DIR": str(self.secure.conf_dir),
            "REGISTRY": str(self.secure.registry.root),
        }

    def _mqtt_args(self, account: str) -> list[str]:
        return ["--mqtt-ca-file", str(self.secure.conf_dir / "ca.crt"),
                "--mqtt-password-file", str(self.secrets_dir / f"{account}-mqtt")]  # fmt: skip

    def _mqtt_url(self, account: str) -> str:
        return f"mqtts://{account}@localhost:{self.broker.port}"

    def _shards_args(self) -> list[str]:
        return [] if self.shards_flag is None else ["--shards", str(self.shards_flag)]

    def start_bridge(self) -> BridgeProcess:
        """One more bridge replica, logged in as ``bridge`` to Redis and the broker, ready."""
        for _ in range(PORT_RACES):
            bridge = self._bridge()
            try:
                _start_bridge(bridge)
            except AssertionError:
                # Another process took the free port between the pick and the bind.
                if "address already in use" not in bridge.log_tail():
                    raise
                continue
            self.bridges.append(bridge)
            return bridge
        raise AssertionError(f"no free HTTP port for a bridge in {PORT_RACES} tries")

    def _bridge(self) -> BridgeProcess:
        bridge = BridgeProcess(
            self.workdir, self._mqtt_url("bridge"), self.redis_url("bridge"),
            "--redis-password-file", str(self.secrets_dir / "bridge-redis"),
            "--share-group", "runbook", *self._mqtt_args("bridge"),
            # No trimming: the verifier counts every entry the load appended.
            "--trim-every-batches", "0",
            # A stopped replica's beat goes stale in 1.5 s, not 15 (change-shards waits on it).
            "--heartbeat-interval-s", "0.5",
        )  # fmt: skip
        _drop_shards_flag(bridge.argv)  # BridgeProcess passes --shards 4 of its own
        bridge.argv += self._shards_args()
        return bridge

    def start_pipeline(self) -> ServiceProcess:
        """``order-pipeline`` (API and one worker) as ``pipeline``, ready."""
        self.pipeline = ServiceProcess("pipeline", self.workdir / "pipeline", [
            console_script("order-pipeline"),
            "--mqtt-url", self._mqtt_url("pipeline"), "--redis-url", self.redis_url("pipeline"),
            "--redis-password-file", str(self.secrets_dir / "pipeline-redis"),
            "--workers", "1", "--claim-idle-ms", "3000", "--claim-every-ms", "1000",
            *self._mqtt_args("pipeline"), *self._shards_args(),
        ])  # fmt: skip
        self.pipeline.start_timeout_s = START_TIMEOUT_S
        self.pipeline.start()
        return self.pipeline

    def stop_bridges(self) -> None:
        """SIGTERM every bridge replica (each drains)."""
        for bridge in self.bridges:
            assert bridge.terminate() == 0, bridge.log_tail()

    def start_bridges(self) -> None:
        """Start the stopped replicas again, same client ids (their broker sessions hold
        what was sent meanwhile), with the rig's current ``--shards`` (or none)."""
        for bridge in self.bridges:
            _drop_shards_flag(bridge.argv)
            bridge.argv += self._shards_args()
            _start_bridge(bridge)

    def restart_bridges(self) -> None:
        """Roll the bridge replicas one at a time (SIGTERM drains, the next takes over)."""
        for bridge in self.bridges:
            assert bridge.terminate() == 0, bridge.log_tail()
            _start_bridge(bridge)

    def device_config(self, device_id: str) -> AgentConfig:
        """The agent of an enrolled device, installed from its registry folder.

        The folder is copied, as to the device: revoking deletes the registry's copy.
        """
        installed = self.workdir / "installed" / device_id
        shutil.rmtree(installed, ignore_errors=True)
        shutil.copytree(self.secure.registry.devices_dir / device_id, installed)
        settings = tomllib.loads((installed / "agent.toml").read_text())
        local = {"ca_file": str(installed / "ca.crt"), "db": ":memory:", "http_enabled": False}
        return AgentConfig(**{**settings, **local, **FAST_RECONNECT})

    def stop(self) -> None:
        """Stop every service, then the servers."""
        for bridge in self.bridges:
            with contextlib.suppress(Exception):
                if bridge.process is not None and bridge.process.poll() is None:
                    bridge.terminate()
        if self.pipeline is not None:
            self.pipeline.stop()
        self.broker.stop()
        self.redis.stop()


def acl_redis(workdir: Path, secrets_dir: Path) -> RedisProcess:
    """Redis on redis/redis.conf with redis-acl/users.acl, each user's password in a file."""
    acl = (REPO / "redis-acl" / "users.acl").read_text()
    for user in REDIS_USERS:
        password = secrets.token_hex(16)
        write_secret(secrets_dir, f"{user}-redis", password)
        acl = acl.replace(f">change-me-{user}", f">{password}")
    acl_file = workdir / "users.acl"
    acl_file.write_text(acl)
    server = RedisProcess.production(workdir / "redis", extra_args=("--aclfile", str(acl_file)))
    server.start_timeout_s = START_TIMEOUT_S
    server.start()
    return server


def load_catalog(rig: Rig) -> None:
    """``order-pipeline catalog load`` as ``admin``."""
    subprocess.run(
        [console_script("order-pipeline"), "catalog", "load", str(DEMO_CATALOG),
         "--redis-url", rig.redis_url("admin"), "--shards", str(SHARDS),
         "--redis-password-file", str(rig.secrets_dir / "admin-redis")],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip


def secure_broker(workdir: Path, secrets_dir: Path, devices: list[str]) -> SecureBroker:
    """The production broker: registry, dev CA, server certificate, accounts, then start."""
    registry = Registry(workdir / "registry")
    ca = registry.dev_ca()
    conf_dir = workdir / "broker"
    conf_dir.mkdir()
    shutil.copy(ca.cert, conf_dir / "ca.crt")
    cert = issue_cert(ca, conf_dir, "localhost", server=True)
    cert.cert.rename(conf_dir / "server.crt")
    cert.key.rename(conf_dir / "server.key")
    for account in ("bridge", "pipeline", "admin"):
        write_secret(secrets_dir, f"{account}-mqtt", registry.add_service(account))
    port = free_port()
    registry.enrol(devices, broker_url=f"mqtts://localhost:{port}", ca=ca)
    # Before the broker's first start its accounts file is the registry's copy.
    shutil.copy(registry.accounts_path, conf_dir / "dynamic-security.json")
    server = MosquittoProcess(conf_dir / "run", port, config=secure_config(conf_dir, port))
    server.start_timeout_s = START_TIMEOUT_S
    server.start()
    return SecureBroker(server, conf_dir, registry)


@contextlib.contextmanager
def running_rig(workdir: Path, devices: list[str], *, bridges: int = 1) -> Iterator[Rig]:
    """Start the rig with ``devices`` enrolled, yield it, stop it all."""
    secrets_dir = workdir / "secrets"
    redis = acl_redis(workdir, secrets_dir)
    try:
        secure = secure_broker(workdir, secrets_dir, devices)
    except BaseException:
        redis.stop()
        raise
    rig = Rig(workdir, secrets_dir, redis, secure)
    try:
        load_catalog(rig)
        for _ in range(bridges):
            rig.start_bridge()
        rig.start_pipeline()
        yield rig
    finally:
        rig.stop()
