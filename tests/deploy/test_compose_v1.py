"""Debian's Compose 1.29 accepts docker-compose.yml under every profile set the docs use.

The cheap part of tests/deploy, in every `make test`: `docker-compose config` parses,
validates and resolves the file as Compose 1.29 does (the inline `configs.content` and
`depends_on.required` of Compose 2 made it refuse the whole file). The engine run is
tests/deploy/test_compose_up.py, also in every `make test`.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Final

import pytest
import yaml

from tests.tools import require_tool

from .stack import COMPOSE_FILE

# Between them every service; each Compose 1.29 start costs seconds, so two sets only.
PROFILE_SETS: Final = {
    ("dev", "fleet", "observability"): {"mosquitto-dev", "redis", "bridge", "pipeline",
                                        "fleet-sim", "prometheus", "grafana"},
    ("secure", "observability"): {"mosquitto-secure", "redis-secure", "bridge-secure",
                                  "pipeline-secure", "prometheus", "grafana"},
}  # fmt: skip


@pytest.mark.parametrize("profiles", list(PROFILE_SETS), ids="+".join)
def test_compose_1_29_resolves_the_file(profiles: tuple[str, ...], tmp_path: Path) -> None:
    """`docker-compose config` exits 0, and the profiles' services are the resolved ones."""
    compose = require_tool("docker-compose")
    argv = [compose, "--file", str(COMPOSE_FILE), "--project-directory", str(tmp_path)]
    for profile in profiles:
        argv += ["--profile", profile]
    done = subprocess.run(
        [*argv, "config"], capture_output=True, text=True, check=False, timeout=60
    )
    assert done.returncode == 0, done.stderr
    resolved = yaml.safe_load(done.stdout)["services"]
    active = {
        name for name, service in resolved.items()
        if not service.get("profiles") or set(service["profiles"]) & set(profiles)
    }  # fmt: skip
    assert PROFILE_SETS[profiles] <= active
    for service in active:
        for dependency in resolved[service].get("depends_on", {}):
            assert dependency in active, (service, dependency)
