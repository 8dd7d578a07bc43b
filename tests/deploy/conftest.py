"""A Docker engine, the images, and the secure compose stack on it (tests/deploy)."""

from __future__ import annotations

import dataclasses
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.tools import require, require_tool, unavailable

from .engine import Client, Engine, engine_answers, find_client, own_root, own_socket
from .images import build_all
from .stack import SecureStack, find_compose

# Extra compose files laid over docker-compose.yml, ':'-separated (a test of the test:
# a broken override must make the deployment test fail).
OVERRIDE_VAR = "DEPLOY_COMPOSE_OVERRIDE"
# What the test runs: the images' registries stand-ins have no Grafana (no Debian package).
UP_SERVICES = ("mosquitto-secure", "redis-secure", "bridge-secure", "pipeline-secure", "prometheus")


@pytest.fixture(scope="session")
def docker_client() -> Client:
    """A docker CLI that builds with BuildKit (Debian's docker.io)."""
    require(os.geteuid() == 0, "the deployment test starts dockerd and chowns files: needs root")
    client = find_client()
    if client is None:
        unavailable("no docker CLI that builds with BuildKit (scripts/ensure-system-deps.sh)")
    root = own_root()
    return client if root is None else dataclasses.replace(client, host=own_socket(root))


@pytest.fixture(scope="session")
def docker_engine(
    docker_client: Client, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[None]:
    """The running engine, or ``dockerd`` started for the session (engine.py)."""
    if engine_answers(docker_client):
        yield
        return
    log = tmp_path_factory.mktemp("dockerd") / "dockerd.log"
    engine = Engine(require_tool("dockerd"), log, own_root())
    engine.start(docker_client)
    try:
        yield
    finally:
        engine.stop()


@pytest.fixture(scope="session")
def images(docker_client: Client, docker_engine: None) -> list[str]:
    """The base, the application image and the stand-ins, built (cached after the first run)."""
    require_tool("mmdebstrap")
    return build_all(docker_client)


@pytest.fixture
def secure_stack(docker_client: Client, images: list[str], tmp_path: Path) -> Iterator[SecureStack]:
    """The secure and observability profiles, provisioned as the docs say, up; down after."""
    compose = find_compose(docker_client)
    if compose is None:
        unavailable("neither `docker compose` nor docker-compose (scripts/ensure-system-deps.sh)")
    directory = tmp_path / "project"
    directory.mkdir()
    overrides = [Path(p) for p in os.environ.get(OVERRIDE_VAR, "").split(":") if p]
    stack = SecureStack(
        compose, docker_client, directory, f"ordersdeploy{uuid.uuid4().hex[:8]}", overrides
    )
    stack.provision()
    try:
        stack.run("up", "--detach", *UP_SERVICES)
        yield stack
    finally:
        stack.run("down", "--volumes", "--timeout", "10")
