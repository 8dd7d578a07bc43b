"""docker-compose.yml's secure profile, provisioned as docs/how-to/deploy-docker.md says.

The project directory is a temporary folder holding what the operator makes (registry/,
certs/, broker-accounts/, secrets/) and links to the repository's config folders, so
the compose file's relative paths resolve as in a checkout; the compose file itself is
the repository's, with ``--project-directory``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from enrolment.pki import issue_cert
from enrolment.provision import Registry

from .engine import Client

REPO: Final = Path(__file__).resolve().parents[2]
COMPOSE_FILE: Final = REPO / "docker-compose.yml"
# The compose file's relative mounts that come from the repository.
REPO_FOLDERS: Final = ("mosquitto", "redis", "deploy")
SERVICES: Final = ("admin", "bridge", "pipeline")
DEVICE: Final = "kiosk-dock"
MOSQUITTO_UID: Final = 1883  # the eclipse-mosquitto image's user
REDIS_UID: Final = 999  # the redis image's user
ORDERS_UID: Final = 10001  # Dockerfile's user
COMPOSE_TIMEOUT_S: Final = 300
PASSWORD_LINE: Final = re.compile(r"(\w+) password \(shown once\): (\S+)\n?")


def find_compose(client: Client) -> list[str] | None:
    """``docker compose`` (v2 plugin) if the client has it, else ``docker-compose`` (v1)."""
    plugin = [client.path, "compose"]
    done = subprocess.run([*plugin, "version"], capture_output=True, check=False, timeout=60)
    if done.returncode == 0:
        return plugin
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


def _tool(*argv: str) -> str:
    """Run one of our console scripts with this interpreter; its stdout."""
    done = subprocess.run(
        [sys.executable, "-m", *argv], capture_output=True, text=True, check=False, timeout=120
    )
    if done.returncode != 0:
        raise RuntimeError(f"{argv} exited {done.returncode}: {done.stderr}")
    return done.stdout


@dataclass
class SecureStack:
    """One compose project of the secure (and observability) profiles."""

    compose: list[str]
    client: Client
    directory: Path
    name: str
    overrides: list[Path] = field(default_factory=list)
    passwords: dict[str, str] = field(default_factory=dict)
    read_token: str = ""

    # -- provisioning: the steps of docs/how-to/deploy-docker.md, in order ------------
    def provision(self) -> None:
        """Accounts, certificates, Redis users, owners and modes, API tokens."""
        d = self.directory
        for folder in REPO_FOLDERS:
            (d / folder).symlink_to(REPO / folder)
        registry = d / "registry"
        # 1. Broker accounts, the device, the server certificate, the broker's copy.
        for service in SERVICES:
            out = _tool("enrolment.cli", "--registry", str(registry), "service", service)
            match = PASSWORD_LINE.fullmatch(out)
            assert match is not None, out
            assert match.group(1) == service, out
            self.passwords[service] = match.group(2)
        _tool(
            "enrolment.cli", "--registry", str(registry), "devices", DEVICE,
            "--broker", "mqtts://localhost:8883", "--dev-ca",
        )  # fmt: skip
        certs = d / "certs"
        certs.mkdir()
        ca = Registry(registry).dev_ca()
        server = issue_cert(ca, certs, "mosquitto", server=True)
        server.cert.rename(certs / "server.crt")
        server.key.rename(certs / "server.key")
        shutil.copy(ca.cert, certs / "ca.crt")
        accounts = d / "broker-accounts"
        accounts.mkdir()
        shutil.copy(registry / "dynamic-security.json", accounts)
        # 2. Redis users with real passwords (the same ones as the broker's, for brevity).
        acl = (REPO / "redis-acl" / "users.acl").read_text()
        for service in SERVICES:
            acl = acl.replace(f">change-me-{service}", f">{self.passwords[service]}")
        assert "change-me" not in acl
        (registry / "redis-users.acl").write_text(acl)
        # 3. Owners and modes: the containers drop root.
        for path, mode, uid in (
            (accounts, 0o700, MOSQUITTO_UID),
            (accounts / "dynamic-security.json", 0o600, MOSQUITTO_UID),
            (certs / "server.key", 0o600, MOSQUITTO_UID),
            (registry / "redis-users.acl", 0o600, REDIS_UID),
        ):
            os.chown(path, uid, uid)
            path.chmod(mode)
        # The orders API's tokens: the pipeline (uid 10001) and Prometheus read them.
        secrets = d / "secrets"
        secrets.mkdir()
        tokens = secrets / "orders-api-tokens"
        _tool("pipeline.cli", "token", "new", "--role", "operate", "--name", "alice",
              "--tokens-file", str(tokens))  # fmt: skip
        self.read_token = _tool(
            "pipeline.cli", "token", "new", "--role", "read", "--name", "prometheus",
            "--tokens-file", str(tokens),
        )  # fmt: skip
        (secrets / "prometheus-read-token").write_text(self.read_token)

    def env(self) -> dict[str, str]:
        """4. Each service's own accounts: the user in the URL, the password apart."""
        env = {**self.client.env()}
        for service in ("bridge", "pipeline"):
            upper = service.upper()
            env[f"{upper}_MQTT_URL"] = f"mqtts://{service}@mosquitto:8883"
            env[f"{upper}_MQTT_PASSWORD"] = self.passwords[service]
            env[f"{upper}_REDIS_URL"] = f"redis://{service}@redis:6379/0"
            env[f"{upper}_REDIS_PASSWORD"] = self.passwords[service]
        return env

    # -- compose and the engine -------------------------------------------------------
    def run(self, *args: str, timeout_s: float = COMPOSE_TIMEOUT_S) -> str:
        """5. ``docker compose -p NAME -f docker-compose.yml [-f override] ARGS``; stdout."""
        argv = [*self.compose, "--project-name", self.name, "--project-directory",
                str(self.directory), "--file", str(COMPOSE_FILE)]  # fmt: skip
        for override in self.overrides:
            argv += ["--file", str(override)]
        argv += ["--profile", "secure", "--profile", "observability", *args]
        done = subprocess.run(
            argv, capture_output=True, text=True, env=self.env(), timeout=timeout_s, check=False
        )
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} exited {done.returncode}:\n{done.stderr}")
        return done.stdout

    def docker(self, *args: str) -> str:
        """A docker CLI command; stdout."""
        done = subprocess.run(
            [self.client.path, *args], capture_output=True, text=True, check=False, timeout=120,
            env=self.client.env(),
        )  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"docker {' '.join(args)} exited {done.returncode}: {done.stderr}")
        return done.stdout

    def containers(self, service: str) -> list[str]:
        """The ids of ``service``'s containers."""
        return self.run("ps", "-q", service).split()

    def inspect(self, container: str) -> dict[str, Any]:
        """``docker inspect`` of one container."""
        [found] = json.loads(self.docker("inspect", container))
        assert isinstance(found, dict)
        return found

    def address(self, service: str) -> str:
        """The IP address of ``service``'s (first) container on the project network."""
        networks = self.docker(
            "inspect", "--format", "{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}",
            self.containers(service)[0],
        ).split()  # fmt: skip
        return networks[0]

    def leftovers(self) -> dict[str, list[str]]:
        """Containers, networks and volumes that still carry this project's label."""
        label = f"label=com.docker.compose.project={self.name}"
        return {
            kind: self.docker(*command, "--filter", label, "--quiet").split()
            for kind, command in (
                ("containers", ("ps", "--all")),
                ("networks", ("network", "ls")),
                ("volumes", ("volume", "ls")),
            )
        }

    def logs(self) -> str:
        """Every service's log, for a failure's explanation."""
        try:
            return self.run("logs", "--no-color", "--tail", "40", timeout_s=60)
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            return f"(no logs: {exc})"
