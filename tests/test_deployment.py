"""docker-compose.yml and the Dockerfile, checked statically (tests/deploy runs them)."""

from __future__ import annotations

import copy
import json
import re
import tomllib
from collections.abc import Callable, Iterator
from importlib.resources import files
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from jsonschema.protocols import Validator

REPO = Path(__file__).resolve().parents[1]
# Folders the operator makes before `docker compose up` (docs/how-to/deploy-docker.md).
OPERATOR_MADE = ("./registry", "./certs", "./broker-accounts")

# The Compose Specification's JSON Schema as check-jsonschema vendors it: the version is the
# one uv.lock pins, so the schema changes only with `make lock UPGRADE=--upgrade`.
COMPOSE_SCHEMA = files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json"

# Docker Compose 2.x features (docs.docker.com, Compose file reference) that Compose v1
# (Debian's docker-compose 1.29) rejects; the file must run under both, so it uses none.
ADD_ON_PROFILES = {"fleet", "observability"}
FEATURE_SINCE = {
    "depends_on.required": (2, 20, 0),
    "configs.content": (2, 23, 1),
}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    """The parsed compose file."""
    data: dict[str, Any] = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    return data


@pytest.fixture(scope="module")
def compose_validator() -> Validator:
    """A validator for the Compose Specification, with format checks on."""
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    validator_class = jsonschema.validators.validator_for(schema)
    validator_class.check_schema(schema)
    validator: Validator = validator_class(schema, format_checker=validator_class.FORMAT_CHECKER)
    return validator


def schema_errors(validator: Validator, document: dict[str, Any]) -> list[tuple[str, str]]:
    """Every violation as (dotted path, message); the document itself is the empty path."""
    return [
        (".".join(str(part) for part in error.absolute_path), error.message)
        for error in validator.iter_errors(document)
    ]


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
    for name in ("bridge", "bridge-secure"):
        assert services[name]["deploy"]["replicas"] == 2, name
    for name in ("redis", "redis-secure"):
        command = services[name]["command"]
        assert command[0] == "redis-server", name
        assert f"./redis/redis.conf:{command[1]}:ro" in services[name]["volumes"], name
    conf = (REPO / "redis" / "redis.conf").read_text().splitlines()
    assert {"appendonly yes", "appendfsync always", "maxmemory-policy noeviction"} <= set(conf)
    declared = set(compose["volumes"])
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            assert source.startswith("./") or source in declared, volume
            if source.startswith("./"):
                assert (REPO / source).exists() or source.startswith(OPERATOR_MADE), source


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
    # The plugin saves its accounts after every live change, through a new file and a
    # rename: its own writable folder, never the registry's file (order-enrol writes that).
    assert "./broker-accounts:/mosquitto/accounts" in mounts
    assert not [m for m in mounts if "registry/dynamic-security.json" in m]


def test_secure_profile_runs_redis_with_acl_users(compose: dict[str, Any]) -> None:
    """The secure profile's Redis loads an ACL file and stands in for `redis`; services take
    their own accounts' URLs; the bridge's ops port is opened explicitly."""
    services = compose["services"]
    secure = services["redis-secure"]
    assert secure["profiles"] == ["secure"]
    assert services["redis"]["profiles"] == ["dev"]
    assert "redis" in secure["networks"]["default"]["aliases"]
    command = secure["command"]
    assert command[command.index("--aclfile") + 1] == "/usr/local/etc/redis/users.acl"
    assert "./registry/redis-users.acl:/usr/local/etc/redis/users.acl:ro" in secure["volumes"]
    for name, account in (("bridge", "BRIDGE"), ("pipeline", "PIPELINE")):
        for service in (name, f"{name}-secure"):
            env = services[service]["environment"]
            assert env["ORDERS_REDIS_URL"].startswith(f"${{{account}_REDIS_URL:-"), service
            assert env["ORDERS_MQTT_URL"].startswith(f"${{{account}_MQTT_URL:-"), service
        secure = services[f"{name}-secure"]
        assert set(secure["depends_on"]) == {"redis-secure", "mosquitto-secure"}, name
        assert name in secure["networks"]["default"]["aliases"]
        assert secure["environment"]["ORDERS_MQTT_CA_FILE"] == "/etc/orders/ca.crt"
        assert "./certs/ca.crt:/etc/orders/ca.crt:ro" in secure["volumes"]
        assert set(services[name]["depends_on"]) == {"redis", "mosquitto-dev"}, name
    for name in ("bridge", "bridge-secure"):
        assert services[name]["environment"]["ORDERS_HTTP_HOST"] == "0.0.0.0", name


def test_compose_dev_broker_config_has_the_dev_limits(compose: dict[str, Any]) -> None:
    """The compose dev broker mounts mosquitto/docker-dev.conf: mosquitto/dev.conf's limits,
    on every interface of its container, persistent on its volume."""
    mounts = compose["services"]["mosquitto-dev"]["volumes"]
    assert "./mosquitto/docker-dev.conf:/mosquitto/config/mosquitto.conf:ro" in mounts
    assert "mosquitto-data:/mosquitto/data" in mounts
    conf = (REPO / "mosquitto/docker-dev.conf").read_text().splitlines()
    dev = (REPO / "mosquitto/dev.conf").read_text()
    for line in dev.splitlines():
        if line.startswith("max_"):
            assert line in conf
    assert {"listener 1883 0.0.0.0", "persistence_location /mosquitto/data/"} <= set(conf)


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


def test_compose_file_follows_the_compose_specification(
    compose: dict[str, Any], compose_validator: Validator
) -> None:
    """The whole file, YAML anchors and merge keys resolved, is valid Compose."""
    assert schema_errors(compose_validator, compose) == []


def _unknown_condition(doc: dict[str, Any]) -> None:
    doc["services"]["bridge"]["depends_on"]["redis"]["condition"] = "service_ready"


def _required_as_string(doc: dict[str, Any]) -> None:
    doc["services"]["pipeline"]["depends_on"]["mosquitto-dev"]["required"] = "no"


def _misspelt_service_key(doc: dict[str, Any]) -> None:
    doc["services"]["bridge"]["replica"] = 2


def _secret_file_as_list(doc: dict[str, Any]) -> None:
    doc["secrets"]["orders-api-tokens"]["file"] = ["./secrets/orders-api-tokens"]


def _unknown_top_level_key(doc: dict[str, Any]) -> None:
    doc["service"] = doc.pop("services")


def _healthcheck_test_as_number(doc: dict[str, Any]) -> None:
    doc["services"]["redis"]["healthcheck"]["test"] = 1


@pytest.mark.parametrize(
    ("break_it", "where"),
    [
        (_unknown_condition, "services.bridge.depends_on"),
        (_required_as_string, "services.pipeline.depends_on"),
        (_misspelt_service_key, "services.bridge"),
        (_secret_file_as_list, "secrets.orders-api-tokens.file"),
        (_unknown_top_level_key, ""),
        (_healthcheck_test_as_number, "services.redis.healthcheck.test"),
    ],
)
def test_compose_schema_rejects_a_broken_file(
    compose: dict[str, Any],
    compose_validator: Validator,
    break_it: Callable[[dict[str, Any]], None],
    where: str,
) -> None:
    """The validator bites: one wrong value in a copy of our file fails, at that place."""
    broken = copy.deepcopy(compose)
    break_it(broken)
    errors = schema_errors(compose_validator, broken)
    assert errors, "the schema accepted a broken compose file"
    assert any(path == where or path.startswith(f"{where}.") for path, _ in errors), errors


def _features_used(compose: dict[str, Any]) -> Iterator[str]:
    for service in compose["services"].values():
        depends_on = service.get("depends_on", {})
        if isinstance(depends_on, dict) and any("required" in d for d in depends_on.values()):
            yield "depends_on.required"
    if any("content" in config for config in compose.get("configs", {}).values()):
        yield "configs.content"


def test_compose_v1_accepts_the_file(compose: dict[str, Any]) -> None:
    """No Compose 2.x-only feature, and no depends_on that Compose 1.29 refuses (it fails
    `up` when a dependency's profile is not active): a service depends only on services
    of its own profile or of none; the add-on profiles go with `dev` or `secure`."""
    assert set(_features_used(compose)) == set()
    services = compose["services"]
    for name, service in services.items():
        profiles = set(service.get("profiles", []))
        for target in service.get("depends_on", {}):
            theirs = set(services[target].get("profiles", []))
            assert not theirs or profiles & theirs or (profiles and profiles <= ADD_ON_PROFILES), (
                name,
                target,
            )


def test_docs_state_the_compose_versions() -> None:
    """The Docker runbook names both Compose lines the file runs under."""
    runbook = (REPO / "docs" / "how-to" / "deploy-docker.md").read_text()
    assert "Compose 1.29" in runbook
    assert "Compose 2" in runbook
