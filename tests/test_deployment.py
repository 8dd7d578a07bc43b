"""docker-compose.yml and the Dockerfile, checked statically (no Docker engine runs here)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    """The parsed compose file."""
    data: dict[str, Any] = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    return data


@pytest.fixture(scope="module")
def scripts() -> set[str]:
    """Console scripts the package installs."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return set(project["scripts"])


def test_every_service_has_an_image_and_a_healthcheck(compose: dict[str, Any]) -> None:
    """Services start from an image or our build and tell Docker when they are healthy."""
    services = compose["services"]
    assert {"redis", "bridge", "pipeline", "fleet-sim", "mosquitto-dev", "mosquitto-secure"} <= set(
        services
    )
    for name, service in services.items():
        assert "image" in service or "build" in service, name
        if name != "fleet-sim":
            assert service["healthcheck"]["test"], name


def test_bridge_runs_two_replicas_on_durable_stores(compose: dict[str, Any]) -> None:
    """Two bridge replicas share the subscription; Redis runs redis/redis.conf, data on a volume."""
    services = compose["services"]
    assert services["bridge"]["deploy"]["replicas"] == 2
    redis_service = services["redis"]
    (mounted,) = redis_service["configs"]
    assert redis_service["command"][:2] == ["redis-server", mounted["target"]]
    assert compose["configs"][mounted["source"]]["file"] == "./redis/redis.conf"
    conf = (REPO / "redis" / "redis.conf").read_text().splitlines()
    assert {"appendonly yes", "appendfsync always", "maxmemory-policy noeviction"} <= set(conf)
    declared = set(compose["volumes"])
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            assert source.startswith("./") or source in declared, volume
            if source.startswith("./"):
                assert (REPO / source).exists() or source.startswith(("./registry", "./certs")), (
                    source
                )


def test_services_run_our_console_scripts(compose: dict[str, Any], scripts: set[str]) -> None:
    """Each Python service's command is a console script from pyproject.toml."""
    for name in ("bridge", "pipeline", "fleet-sim"):
        assert compose["services"][name]["command"][0] in scripts, name


def test_broker_profiles_and_mounted_config(compose: dict[str, Any]) -> None:
    """dev and secure brokers are alternatives under one network alias."""
    services = compose["services"]
    assert services["mosquitto-dev"]["profiles"] == ["dev"]
    assert services["mosquitto-secure"]["profiles"] == ["secure"]
    for name in ("mosquitto-dev", "mosquitto-secure"):
        assert "mosquitto" in services[name]["networks"]["default"]["aliases"]
    mounts = services["mosquitto-secure"]["volumes"]
    assert "./mosquitto/secure.conf:/mosquitto/config/mosquitto.conf:ro" in mounts
    assert "./mosquitto/acl:/mosquitto/config/acl:ro" in mounts


def test_inline_dev_broker_config_has_the_dev_limits(compose: dict[str, Any]) -> None:
    """The compose dev broker uses the same limits as mosquitto/dev.conf."""
    inline = compose["configs"]["mosquitto-dev"]["content"]
    dev = (REPO / "mosquitto/dev.conf").read_text()
    for line in dev.splitlines():
        if line.startswith("max_"):
            assert line in inline


def test_dockerfile_copies_every_package(scripts: set[str]) -> None:
    """The image contains every top-level package and runs as a non-root user."""
    dockerfile = (REPO / "Dockerfile").read_text()
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    packages = project["tool"]["setuptools"]["packages"]["find"]["include"]
    for pattern in packages:
        package = pattern.rstrip("*")
        assert re.search(rf"^COPY {package} {package}$", dockerfile, re.M), package
    assert re.search(r"^USER (?!root)", dockerfile, re.M)
    assert scripts
